-- pop3d schema version 2: the leases of many sessions in one statement.
-- Do not edit a shipped migration: add the next one.

-- One round trip for every lease a node takes and gives back at one moment: first the
-- leases p_free_* are released (sessions that ended), then each maildrop of
-- p_mailboxes is leased for the session of the same index in p_owners and listed, as
-- pop3d_open does for one (the listing is read after its lease was taken: a fresh
-- snapshot, so it holds every change the previous holder committed).  Instead of
-- raising, each maildrop answers by rows of index k:
--   status 1: no such maildrop; status 2: another session holds it;
--   status 0: leased: one row per message (id, uidl, size) in order, then one row whose
--   id is NULL (so an empty maildrop answers too).
CREATE FUNCTION pop3d_leases(p_free_mailboxes text[], p_free_owners text[],
                             p_mailboxes text[], p_owners text[],
                             p_node text, p_ttl double precision)
RETURNS TABLE (k integer, status integer, id bigint, uidl text, size bigint)
LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    DELETE FROM maildrop_leases AS l
        USING unnest(p_free_mailboxes, p_free_owners) AS r (mailbox, owner)
        WHERE l.mailbox = r.mailbox AND l.owner = r.owner;
    FOR i IN 1 .. coalesce(array_length(p_mailboxes, 1), 0) LOOP
        k := i;
        id := NULL;
        uidl := NULL;
        size := NULL;
        IF NOT EXISTS (SELECT 1 FROM mailboxes WHERE name = p_mailboxes[i]) THEN
            status := 1;
        ELSIF NOT pop3d_lease(p_mailboxes[i], p_owners[i], p_node, p_ttl) THEN
            status := 2;
        ELSE
            status := 0;
            RETURN QUERY SELECT i, 0, m.id, m.uidl, m.size FROM messages m
                WHERE m.mailbox = p_mailboxes[i] ORDER BY m.id;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
