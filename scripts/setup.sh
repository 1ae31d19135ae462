#!/usr/bin/env bash
# Sets up everything pop3d and its tests need on a fresh Debian machine: the apt tools the
# interop tests drive (real POP3 clients, Dovecot as the reference, swaks for LMTP), and a
# virtual environment in .venv with pop3d installed editable plus its test/lint tools.
# Idempotent: a second run installs nothing new.  Needs root for apt (as CI and sessions are).
set -euo pipefail
cd "$(dirname "$0")/.."

# haproxy: the PROXY protocol tests and the multi-node suite run pop3d behind a real
# HAProxy; postgresql: a throwaway PostgreSQL for the SQL users, store and cluster locks;
# fail2ban: fail2ban-regex checks deploy/fail2ban against real log lines; prometheus: its
# promtool checks the /metrics exposition (Debian ships promtool only in that package);
# dovecot-pgsql: Dovecot's SQL passdb beside pop3d's in bench/cluster.py --versus-dovecot;
# chromium: the testserver web page test drives it headless through Playwright
APT_PACKAGES=(curl openssl mpop fetchmail getmail6 swaks dovecot-pop3d procmail haproxy
              postgresql fail2ban prometheus dovecot-pgsql chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq
    # Debian starts a system-wide Dovecot on 110/995 on install unless policy-rc.d says no.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    ((created_policy)) && rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=25.1"
.venv/bin/python -m pip install -q -e . --group test --group lint
