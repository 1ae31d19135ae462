"""Every limit and timeout of pop3d, each with the reason or the RFC text behind it.

Nothing else in the package hard-codes a number that bounds memory, time or input.
"""

from __future__ import annotations

#: RFC 2449 §4: "The maximum length of a command line, including the keyword, arguments
#: and CRLF, is 255 octets."  (We accept the CRLF in that count, as the RFC says.)
MAX_COMMAND_LINE = 255

#: RFC 2449 §4: "Each argument may be up to 40 characters long."  SASL initial responses
#: (RFC 5034 §4) are exempt: they are bounded by the line limit below instead.
MAX_ARGUMENT = 40

#: RFC 5034 §4: an AUTH continuation line "MUST NOT exceed 255 octets" is *not* said;
#: it says clients "SHOULD" keep lines under the limit but servers must accept SASL
#: responses "at least" as long as the mechanism needs.  SCRAM and PLAIN responses for
#: 255-char user names fit in 2 KiB of base64.
MAX_SASL_LINE = 2048

#: Consecutive malformed or refused commands before we close the connection: enough for
#: a confused client to recover, few enough to stop a scanner (Dovecot closes after 20
#: bad commands, too).
MAX_BAD_COMMANDS = 20

#: Failed authentication attempts on one connection before it is closed.
MAX_AUTH_ATTEMPTS = 3

#: RFC 1939 §3: "the autologout timer MUST be of at least 10 minutes' duration".
DEFAULT_IDLE_TIMEOUT = 600.0
#: How often the deadline sweep looks at every connection (at most; a quarter of a
#: shorter idle or login timeout): a connection is closed between its deadline and this
#: much later.
IDLE_SWEEP_INTERVAL = 1.0

#: ``[server] login_timeout`` default: a connection not logged in after this long is
#: closed, whatever it sends (Dovecot closes them after a fixed time too).  The smaller of
#: this and 3 x ``idle_timeout``: a real client logs in within seconds, while a
#: connection that only talks (``CAPA`` every few seconds) or trickles bytes could
#: otherwise hold a slot for ever.
DEFAULT_LOGIN_TIMEOUT = 60.0
#: The login timeout's default as a multiple of ``idle_timeout``.
LOGIN_TIMEOUT_IDLE_FACTOR = 3.0

#: A command line must be complete this long after its first octet arrived (at most
#: ``idle_timeout``): activity is a complete command, not a byte, and a client that
#: trickles one octet at a time never completes one.  255 octets in 30 s is a link of
#: under 70 bit/s.
COMMAND_LINE_TIMEOUT = 30.0

#: Delay before answering a failed PASS/APOP/AUTH, as Dovecot's auth_failure_delay.
DEFAULT_AUTH_FAILURE_DELAY = 2.0

#: Cap of the per-address doubling of the failure delay (Dovecot's auth penalty caps at 15 s).
MAX_AUTH_FAILURE_DELAY = 15.0

#: An address's failed logins are forgotten after this long without another one, so an
#: office behind one NAT address is not penalised forever (Dovecot's AUTH_PENALTY_TIMEOUT
#: is an hour, too).
AUTH_PENALTY_EXPIRY = 3600.0

#: Addresses whose failures are remembered at once; past this the table is cleared, so a
#: distributed attack costs bounded memory (it then only meets the base delay).
MAX_PENALTY_ADDRESSES = 100_000

#: User names whose failures an address's penalty tells apart (a success forgets that
#: name's own failures only); failures for further names count, and nothing forgets them.
MAX_PENALTY_NAMES = 64

#: Authentications of one address (or IPv6 prefix) in progress at once, each held until
#: its reply is due, including its penalty, even if the client hangs up.  So whatever
#: its parallelism an address gets at most this many verdicts per penalty: with the
#: default 15 s cap, 8 a minute once penalised.  Two, not one: a NAT'ed office's
#: logins with a slow hash need not queue behind each other.
MAX_AUTH_IN_FLIGHT_PER_ADDRESS = 2

#: ``[auth] ipv6_penalty_prefix`` default: one host, or one customer, usually holds a
#: whole /64 (RFC 6177), and could otherwise take a fresh address for every guess.
DEFAULT_IPV6_PENALTY_PREFIX = 64

#: Chunk a big message is read and sent in: large enough that RETR does few system
#: calls and Python steps (against 256 KiB: docs/performance.md).  server/connection.py
#: makes no chunk while any of the last is left with the transport, so a peer that stops
#: reading holds at most one chunk beyond the kernel's buffers (a stalled 20 MiB RETR
#: held 2.0-2.1 MiB before: a 1 MiB chunk, the high-water mark's worth more, the chunk
#: kept across the wait).
READ_CHUNK = 1024 * 1024

#: Chunk a big message goes on with after its peer stalled (:data:`SHRINK_AFTER_STALL`),
#: doubling up to :data:`READ_CHUNK` while the kernel takes each chunk whole at once:
#: a peer that reads a little now and then holds a small chunk, not a full one, each
#: time it stalls again.  The first chunk of a message is a full one (starting small
#: cost every big RETR three more reads and writes: docs/performance.md).
READ_CHUNK_AFTER_STALL = 64 * 1024

#: A message's bytes are passed to the socket once this much is queued: a small message
#: then leaves in one write with its status line and terminator.
WRITE_COALESCE = 64 * 1024

#: Transport high-water mark: the driver waits for the socket to drain past this.
WRITE_HIGH_WATER = 512 * 1024

#: A RETR whose peer has not drained its output for this long drops its read buffer
#: until the peer reads again: a client that stalls a big RETR costs at most the chunk
#: the transport still holds beyond the kernel's socket buffers.  Short enough that a
#: stalled reader frees it at once, long enough that a fast client, whose output drains
#: within milliseconds, keeps its buffer.
SHRINK_AFTER_STALL = 0.25

#: Coalesced writes (of :data:`WRITE_COALESCE` octets) one connection makes before the
#: others get their turn of the event loop: while the kernel keeps taking a pipelining
#: client's replies, it is answered 256 KiB at a time, not for seconds on end.
WRITES_PER_TURN = 4
#: Commands one connection has answered before the others get their turn, for the same
#: reason: a flood of ``NOOP`` (5 octets a reply) is served a thousand at a time.
COMMANDS_PER_TURN = 1024

#: What one connection may hold of its own output beyond the kernel's socket buffers:
#: the transport's buffer (up to the high-water mark plus one coalesced write) and the
#: reply being made (an inline message is at most 64 KiB; a listing is bounded by the
#: maildrop).  Past the high-water mark no further command is answered and nothing is
#: read until the peer takes its replies, so a client pipelining without reading costs
#: about this much (RETR x1000 per write once held 1.3 GiB).
OUTPUT_BUDGET = WRITE_HIGH_WATER + 2 * WRITE_COALESCE

#: Received bytes held unparsed (pipelined commands not yet answered).  A client may
#: pipeline as much as it likes (RFC 2449 §6.6), but we stop reading past this until the
#: backlog is answered, so a flood costs bounded memory.
MAX_PENDING_INPUT = 64 * 1024

#: Longest user name, in octets of UTF-8, wherever one is taken (USER, APOP, a SASL
#: identity, the passwd-file, ``pop3d user add``): one path component once ``%u`` puts it
#: in a path (NAME_MAX on Linux, ext4, XFS and btrfs alike), far above any real name, and
#: it keeps every log line and lookup bounded.
MAX_USERNAME = 255

#: Upper bound of a message number.  RFC 1939 numbers are positive decimals; anything
#: longer than this many digits cannot name a message in any real maildrop.
MAX_NUMBER_DIGITS = 10

#: RFC 1939 §7: a unique-id is "up to 70 characters" in 0x21-0x7E.
MAX_UIDL = 70

#: After a deadline's farewell, time given to the peer to take it before the connection
#: is cut (a peer that never reads would hold a closing connection for ever).
CLOSE_GRACE = 5.0

#: Time given to open sessions to finish after SIGTERM before they are cut.
SHUTDOWN_GRACE = 5.0

#: LMTP connections one client address may hold at once (``[lmtp]
#: max_connections_per_ip``).  An MTA opens few: Postfix's default per-destination
#: concurrency is 20, so 64 leaves room for three of them behind one address, and a
#: runaway or hostile client cannot hold every slot.
LMTP_MAX_CONNECTIONS_PER_IP = 64

#: LMTP connections a worker process holds at once (``[lmtp] max_connections``), from all
#: addresses and UNIX-socket peers together; each costs a task and a spool file.
LMTP_MAX_CONNECTIONS = 1000

# ---------------------------------------------------------------------- the accept path
# (src/pop3d/server/accept.py: what a connection may cost before its POP3 session starts)

#: Time from accept until the POP3 session starts on a connection that must first send a
#: PROXY header or complete an implicit-TLS handshake, and time allowed for the TLS
#: handshake that follows STLS (``[server] handshake_timeout``, both).
#: Both take one or two round trips (a TLS 1.2 handshake two, plus the client's key
#: exchange), well under a second on any real link; 10 s leaves room for a lossy mobile
#: link while a client that connects and says nothing is gone in 10 s, not 30 or never.
HANDSHAKE_TIMEOUT = 10.0

#: Implicit-TLS handshakes one worker runs at once (``[server] max_tls_handshakes``).  A
#: handshake costs about a millisecond of CPU (key exchange and signature) and its
#: buffers; more at once do not finish sooner on one core, they only hold more memory.
#: Connections past the bound wait, reading paused, for a free slot within their
#: ``handshake_timeout`` (a connection that has sent nothing holds no slot at all).
MAX_TLS_HANDSHAKES = 64

#: Size of the buffer each implicit-TLS connection reads ciphertext into, on asyncio.
#: asyncio's default is 256 KiB per connection, allocated and zeroed whether or not the
#: client ever sends that much, which made an idle POP3S session cost 280 KiB.  16 KiB
#: holds a whole TLS record's payload (RFC 8446 §5.1: at most 2^14 octets), and POP3
#: clients send short command lines: reads are no more frequent in practice.
TLS_READ_BUFFER = 16 * 1024

#: The largest PROXY protocol v2 header length accepted (the 16-octet fixed part not
#: counted).  The addresses take at most 216 octets (AF_UNIX); HAProxy's TLVs (ALPN,
#: authority, unique id up to 128, SSL version/CN/cipher/algorithms) fit well in the rest.
PROXY_V2_MAX_LENGTH = 1536
