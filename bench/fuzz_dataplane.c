/* libFuzzer target for the native data plane (relay/net/dataplane.c), run by bench/fuzz.sh:
 *     clang -g -O1 -fsanitize=fuzzer,address,undefined -I relay/net bench/fuzz_dataplane.c
 *
 * One data plane, never started (no thread, no sockets: sends go to descriptor -1), with one
 * allocation, is driven by the input as a sequence of operations: datagrams from the client
 * or from a peer, table changes (permissions, channels, budgets) and queue reads.  Every
 * datagram goes through the same parsing and forwarding code the thread runs.  The Send
 * indication parser is also compared byte for byte with the Python codec by
 * tests/unit/test_dataplane.py.
 */
#include "dataplane.c"

static dp_t *plane;
static dp_alloc_t *alloc;
static dp_budget_t *budget;

static const unsigned char CLIENT[4] = {192, 0, 2, 1};
static const unsigned char PEERS[2][16] = {{198, 51, 100, 1}, {0x20, 0x01, 0x0d, 0xb8, [15] = 1}};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!plane) {
        plane = dp_new(64);
        dp_add_listener(plane, -1);
        budget = dp_budget_new();
        alloc = dp_alloc_add(plane, 0, CLIENT, 4, 5000, -1, -1, budget, NULL);
        dp_set_own_port(plane, 3478, 1);
    }
    /* Records: op (1 byte), length (1 byte), that many bytes. */
    size_t offset = 0;
    while (offset + 2 <= size) {
        unsigned op = data[offset], len = data[offset + 1];
        const uint8_t *arg = data + offset + 2;
        if (offset + 2 + len > size)
            len = (unsigned)(size - offset - 2);
        offset += 2 + len;
        int v6 = op & 0x80, ip_len = v6 ? 16 : 4, port = len >= 2 ? arg[0] << 8 | arg[1] : 9;
        const unsigned char *peer = PEERS[v6 ? 1 : 0];
        switch (op & 0x7) {
        case 0: /* from the client, or from a stranger */
            dp_inject(plane, 0, 0, alloc, (op & 8) ? PEERS[0] : CLIENT, 4, 5000, arg, (int)len);
            break;
        case 1: /* from a peer, on the relay socket */
            dp_inject(plane, 1, 0, alloc, peer, ip_len, port, arg, (int)len);
            break;
        case 2:
            dp_permit(plane, alloc, peer, ip_len, op & 8);
            break;
        case 3:
            dp_unpermit(plane, alloc, peer, ip_len);
            break;
        case 4:
            dp_bind_channel(plane, alloc, 0x4000 | (port & 0x3FFF), peer, ip_len, port);
            break;
        case 5:
            dp_unbind_channel(plane, alloc, 0x4000 | (port & 0x3FFF));
            break;
        case 6:
            dp_budget_refill(budget, len >= 2 ? port : 0, len >= 1 ? arg[0] : 0);
            break;
        case 7: {
            unsigned char buf[2048], ip[16];
            int listener, got_ip_len, got_port;
            while (dp_pop(plane, buf, sizeof buf, &listener, ip, &got_ip_len, &got_port) != -1) {
            }
            unsigned long long counters[DP_COUNTERS];
            dp_take_counters(plane, alloc, counters);
            int payload_offset, payload_len;
            if (dp_parse_send(arg, (int)len, ip, &got_ip_len, &got_port, &payload_offset,
                              &payload_len) == 0 &&
                (payload_offset < 20 || payload_offset + payload_len > (int)len))
                __builtin_trap(); /* the payload must lie inside the message */
            break;
        }
        }
    }
    return 0;
}
