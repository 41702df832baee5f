/* The native UDP data plane's interface: what relay/net/dataplane_build.py gives cffi's cdef
 * and what dataplane.c implements.  No preprocessor lines here: cffi parses this file as is.
 *
 * The data plane executes tables that Python installs and decides nothing: an allocation
 * (a client listener and the client's address -> its relay sockets), permissions (peer IPs),
 * channel bindings (number <-> peer) and budgets (bytes and packets per second, refilled by
 * the core's tick).  Datagrams it cannot forward from those tables alone go to Python through
 * a bounded queue (dp_pop), announced on an eventfd (dp_event_fd).
 *
 * Addresses cross this interface as (ip: 4 or 16 bytes, port); return values below zero are
 * negated errno values.  Every function may be called from any thread while the data plane
 * runs: each takes the data plane's lock.
 */

typedef struct dp dp_t;
typedef struct dp_alloc dp_alloc_t;
typedef struct dp_budget dp_budget_t;

/* Counters, as dp_stats fills them. */
enum {
    DP_STAT_RECEIVED,        /* datagrams read, from clients and peers */
    DP_STAT_FORWARDED,       /* datagrams relayed (either way) */
    DP_STAT_QUEUED,          /* datagrams handed to Python */
    DP_STAT_QUEUE_DROPPED,   /* datagrams for Python dropped: the queue was full */
    DP_STAT_DROPPED,         /* datagrams dropped by the tables (no allocation, channel, permission) */
    DP_STAT_SEND_ERRORS,     /* sends the kernel refused (a full buffer, an ICMP error) */
    DP_STAT_GSO_SENDS,       /* groups of datagrams sent as one UDP GSO superpacket */
    DP_STAT_GSO_REFUSED,     /* superpackets the kernel refused (then sent one by one; GSO off) */
    DP_STAT_COUNT
};

/* Per allocation, as dp_take_counters fills them (and zeroes its own). */
enum {
    DP_BYTES_FROM_CLIENT, DP_PACKETS_FROM_CLIENT, DP_BYTES_TO_CLIENT, DP_PACKETS_TO_CLIENT,
    DP_LIMITED_PACKETS, DP_LIMITED_BYTES, DP_COUNTERS
};

dp_t *dp_new(int queue_capacity);
int dp_start(dp_t *dp);
void dp_free(dp_t *dp);
int dp_event_fd(dp_t *dp);
/* UDP GSO for the sends (on from dp_new where the kernel has it): `enable` 0 turns it off,
 * 1 back on where the kernel has it, -1 leaves it; returns whether it is on. */
int dp_gso(dp_t *dp, int enable);

int dp_add_listener(dp_t *dp, int fd);
int dp_remove_listener(dp_t *dp, int listener);
void dp_set_own_port(dp_t *dp, int port, int own);

/* Budgets need no data plane: Python spends them too (dp_budget_charge), and one may outlive
 * it.  dp_budget_new's reference is Python's, dropped by dp_budget_release; each allocation
 * installed with a budget holds another until it is freed. */
dp_budget_t *dp_budget_new(void);
void dp_budget_refill(dp_budget_t *budget, long long bandwidth, long long packet_rate);
int dp_budget_affords(dp_budget_t *budget, long long size);
void dp_budget_charge(dp_budget_t *budget, long long size);
void dp_budget_release(dp_budget_t *budget);

dp_alloc_t *dp_alloc_add(dp_t *dp, int listener, const unsigned char *ip, int ip_len, int port,
                         int relay4_fd, int relay6_fd, dp_budget_t *budget,
                         dp_budget_t *account_budget);
void dp_alloc_remove(dp_t *dp, dp_alloc_t *alloc, unsigned long long *last_counters);
int dp_permit(dp_t *dp, dp_alloc_t *alloc, const unsigned char *ip, int ip_len, int native_send);
int dp_unpermit(dp_t *dp, dp_alloc_t *alloc, const unsigned char *ip, int ip_len);
int dp_bind_channel(dp_t *dp, dp_alloc_t *alloc, int number, const unsigned char *ip, int ip_len,
                    int port);
int dp_unbind_channel(dp_t *dp, dp_alloc_t *alloc, int number);
void dp_take_counters(dp_t *dp, dp_alloc_t *alloc, unsigned long long *out);

int dp_pop(dp_t *dp, unsigned char *buf, int capacity, int *listener, unsigned char *ip,
           int *ip_len, int *port);
/* Read `listener`'s socket now, on the caller's thread (relay.net.steering: before a request
 * that reached another socket): the datagrams queued for Python then, 0 when none. */
int dp_catch_up(dp_t *dp, int listener);
void dp_stats(dp_t *dp, unsigned long long *out);

/* parse_send, the Send indication parser, alone: 0 and the peer and payload's place, or -1
 * for anything relay.proto.stun.parse_send_indication refuses (tested against it). */
int dp_parse_send(const unsigned char *data, int len, unsigned char *ip, int *ip_len, int *port,
                  int *payload_offset, int *payload_len);

/* One datagram through the tables without sockets or threads: the fuzz target's and the unit
 * tests' entry.  from_peer: 0 = from a client on `listener`, 1 = from a peer on `alloc`'s
 * relay socket of the peer's family.  Sends go to the descriptors installed (-1: nowhere). */
void dp_inject(dp_t *dp, int from_peer, int listener, dp_alloc_t *alloc,
               const unsigned char *ip, int ip_len, int port, const unsigned char *data, int len);
