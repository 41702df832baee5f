/* The native UDP data plane (see dataplane.h): one thread over epoll, reading client listeners
 * and relay sockets with recvmmsg and relaying with sendmmsg, from tables Python installs.
 *
 * It forwards exactly what the Python hot path (relay/core/allocation.py) forwards, with the
 * same checks in the same order, and counts the same bytes: ChannelData and Send indications
 * from a client with an allocation, datagrams from a permitted peer.  Everything else a client
 * sends goes to Python through the queue; what the tables refuse is dropped and counted.
 *
 * Memory safety: every read of a datagram is bounded by its length, checked before the read;
 * the tables are bounded by what Python installs (its max_permissions/max_channels).
 * Concurrency: one lock.  The thread holds it from reading a socket to its last send, so a
 * table change never races a packet; a removed allocation's memory is freed by the thread
 * itself before its next epoll_wait, so an event already fetched never points at freed memory.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dataplane.h"

#define UNLIMITED (1LL << 62)
#define BATCH 32             /* datagrams per recvmmsg/sendmmsg */
#define ROUNDS 4             /* recvmmsg calls per readable socket before the next one's turn */
#define MAX_DATAGRAM 65536
#define MAX_LISTENERS 64
#define MAGIC_COOKIE 0x2112A442u
#define FINGERPRINT_XOR 0x5354554Eu
#define SEND_INDICATION 0x0016
#define DATA_INDICATION 0x0017
#define ATTR_MESSAGE_INTEGRITY 0x0008
#define ATTR_XOR_PEER_ADDRESS 0x0012
#define ATTR_DATA 0x0013
#define ATTR_MESSAGE_INTEGRITY_SHA256 0x001C
#define ATTR_FINGERPRINT 0x8028
#define TID_POOL 4096        /* transaction ids drawn per getrandom call */
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103      /* Linux 4.18's UDP GSO, for headers older than the kernel */
#endif
#define GSO_MAX_SEGMENTS 64  /* the kernel's UDP_MAX_SEGMENTS before 6.9 */
#define GSO_MAX_BYTES 60000  /* a superpacket stays one IP datagram (64 KiB, headers included) */

enum { K_WAKE, K_LISTENER, K_RELAY };

/* A transport address as a key: family, port and IP, zero padded, comparable with memcmp. */
struct addr {
    uint8_t family; /* 4 or 6 */
    uint8_t pad;
    uint16_t port;  /* host order */
    uint8_t ip[16];
};

struct dsock {
    int kind;
    int fd;
    int listener;
    struct dp_alloc *alloc;
};

/* This second's balance.  The thread and Python (a TCP relay of the same account, a datagram
 * the data plane hands over) spend it alike, so every access is atomic and none needs the data
 * plane's lock: a budget lives on while Python or an installed allocation holds a reference. */
struct dp_budget {
    long long bytes, packets;
    int refs;
};

struct perm {
    uint8_t family;
    uint8_t native_send; /* 0: Send indications to it go to Python (a relay-only peer) */
    uint8_t ip[16];
};

struct chan {
    int number;
    struct addr peer;
};

struct dp_alloc {
    struct dp_alloc *next;    /* in its hash bucket, then in the garbage list */
    int listener;
    int dead;
    struct addr client;
    struct dsock relay[2];    /* [0] IPv4, [1] IPv6; fd -1 when none */
    dp_budget_t *budget, *account;
    int nperm, capperm, nchan, capchan;
    struct perm *perms;
    struct chan *chans;
    unsigned long long counters[DP_COUNTERS];
};

struct listener {
    struct dsock sock;
    int used;
};

struct qitem {
    int listener;
    struct addr src;
    int len;
    unsigned char data[];
};

/* One batch of datagrams out: a header, the payload where it was read, padding.
 *
 * At the flush, the datagrams to one destination through one socket that follow one another
 * in the batch with one size (the last may be shorter) become one group, sent as one UDP GSO
 * superpacket (UDP_SEGMENT): the kernel then builds, routes and queues the group once and
 * cuts it into datagrams at the end (the device, or the receiving socket on loopback).  A
 * group never reorders a flow: a datagram of another size starts a new group. */
struct out {
    int n;
    int fd[BATCH];
    int len[BATCH];
    struct mmsghdr msg[BATCH];
    struct iovec iov[BATCH][3];
    unsigned char head[BATCH][48];
    struct sockaddr_storage to[BATCH];
    /* the groups of the flush: group g holds datagrams order[first[g]..first[g]+count[g]) */
    int ngroups;
    int group_of[BATCH], order[BATCH], first[BATCH], count[BATCH], bytes[BATCH];
    struct mmsghdr gmsg[BATCH];
    struct iovec giov[BATCH * 3];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(uint16_t))];
    } gctl[BATCH];
};

struct dp {
    pthread_mutex_t lock;
    pthread_t thread;
    int started, stopping;
    int epfd, wakefd, eventfd;
    struct dsock wake;
    struct listener listeners[MAX_LISTENERS];
    struct dp_alloc **buckets;
    unsigned nbuckets, nallocs;
    struct dp_alloc *garbage;
    struct qitem **queue;
    int qcap, qhead, qlen;
    uint8_t own_ports[65536 / 8];
    unsigned char tids[12 * TID_POOL];
    int tid_offset;
    unsigned long long stats[DP_STAT_COUNT];
    int gso;                  /* 1 while UDP GSO works here (probed at dp_new, off on a refusal) */
    /* receive side of a batch */
    unsigned char *rbuf;      /* BATCH * MAX_DATAGRAM */
    struct mmsghdr rmsg[BATCH];
    struct iovec riov[BATCH];
    struct sockaddr_storage rfrom[BATCH];
    struct out out;
};

static const unsigned char PADDING[4] = {0, 0, 0, 0};

/* -- addresses ------------------------------------------------------------------------------ */

static int make_addr(struct addr *a, const unsigned char *ip, int ip_len, int port)
{
    if ((ip_len != 4 && ip_len != 16) || port < 0 || port > 65535)
        return -EINVAL;
    memset(a, 0, sizeof *a);
    a->family = ip_len == 4 ? 4 : 6;
    a->port = (uint16_t)port;
    memcpy(a->ip, ip, (size_t)ip_len);
    return 0;
}

static int from_sockaddr(struct addr *a, const struct sockaddr_storage *ss)
{
    memset(a, 0, sizeof *a);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        a->family = 4;
        a->port = ntohs(in->sin_port);
        memcpy(a->ip, &in->sin_addr, 4);
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        a->family = 6;
        a->port = ntohs(in6->sin6_port);
        memcpy(a->ip, &in6->sin6_addr, 16);
        return 0;
    }
    return -1;
}

static socklen_t to_sockaddr(const struct addr *a, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(struct sockaddr_in6));
    if (a->family == 4) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(a->port);
        memcpy(&in->sin_addr, a->ip, 4);
        return sizeof *in;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(a->port);
    memcpy(&in6->sin6_addr, a->ip, 16);
    return sizeof *in6;
}

static int ip_len_of(const struct addr *a)
{
    return a->family == 4 ? 4 : 16;
}

static unsigned hash_key(int listener, const struct addr *a)
{
    const unsigned char *p = (const unsigned char *)a;
    uint32_t h = 2166136261u ^ (uint32_t)listener;
    for (size_t i = 0; i < sizeof *a; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* -- the allocation table ------------------------------------------------------------------- */

static struct dp_alloc *lookup(dp_t *dp, int listener, const struct addr *client)
{
    struct dp_alloc *a = dp->buckets[hash_key(listener, client) & (dp->nbuckets - 1)];
    for (; a; a = a->next)
        if (a->listener == listener && memcmp(&a->client, client, sizeof *client) == 0)
            return a;
    return NULL;
}

static int grow(dp_t *dp)
{
    unsigned size = dp->nbuckets * 2;
    struct dp_alloc **buckets = calloc(size, sizeof *buckets);
    if (!buckets)
        return -ENOMEM;
    for (unsigned i = 0; i < dp->nbuckets; i++) {
        struct dp_alloc *a = dp->buckets[i], *next;
        for (; a; a = next) {
            next = a->next;
            unsigned b = hash_key(a->listener, &a->client) & (size - 1);
            a->next = buckets[b];
            buckets[b] = a;
        }
    }
    free(dp->buckets);
    dp->buckets = buckets;
    dp->nbuckets = size;
    return 0;
}

static struct perm *find_perm(struct dp_alloc *a, int family, const uint8_t *ip)
{
    size_t len = family == 4 ? 4 : 16;
    for (int i = 0; i < a->nperm; i++)
        if (a->perms[i].family == family && memcmp(a->perms[i].ip, ip, len) == 0)
            return &a->perms[i];
    return NULL;
}

static struct chan *find_chan(struct dp_alloc *a, int number)
{
    for (int i = 0; i < a->nchan; i++)
        if (a->chans[i].number == number)
            return &a->chans[i];
    return NULL;
}

static struct chan *find_chan_of_peer(struct dp_alloc *a, const struct addr *peer)
{
    for (int i = 0; i < a->nchan; i++)
        if (memcmp(&a->chans[i].peer, peer, sizeof *peer) == 0)
            return &a->chans[i];
    return NULL;
}

static long long balance(const long long *field)
{
    return __atomic_load_n(field, __ATOMIC_RELAXED);
}

/* Room for a datagram of `size` bytes in `b` (NULL: no limit).  A datagram that passes this
 * while another thread spends the same budget may overdraw it: the debt is paid from the next
 * second's, as a TCP read's is. */
static int affords(dp_budget_t *b, long long size)
{
    return !b || (size <= balance(&b->bytes) && balance(&b->packets) >= 1);
}

static void charge(dp_budget_t *b, long long size)
{
    if (b) {
        __atomic_sub_fetch(&b->bytes, size, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&b->packets, 1, __ATOMIC_RELAXED);
    }
}

/* Take one packet of `size` bytes from the allocation's and its account's budgets, as
 * Allocation._spend does: 0 (drop, and count it) when either would overdraw. */
static int spend(struct dp_alloc *a, long long size)
{
    if (!affords(a->budget, size) || !affords(a->account, size)) {
        a->counters[DP_LIMITED_PACKETS] += 1;
        a->counters[DP_LIMITED_BYTES] += (unsigned long long)size;
        return 0;
    }
    charge(a->budget, size);
    charge(a->account, size);
    return 1;
}

/* -- STUN ----------------------------------------------------------------------------------- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t len)
{
    uint32_t c = 0xFFFFFFFFu;
    while (len--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static unsigned get16(const unsigned char *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* The peer and payload of a Send indication, with the checks and first-value-wins rule of
 * relay.proto.stun.parse_send_indication; -1 for anything it would refuse. */
static int parse_send(const unsigned char *d, int end, struct addr *peer,
                      const unsigned char **payload, int *payload_len)
{
    if (end < 20 || end % 4 || get16(d) != SEND_INDICATION || (int)get16(d + 2) != end - 20 ||
        get32(d + 4) != MAGIC_COOKIE)
        return -1;
    const unsigned char *xpeer = NULL;
    int xpeer_len = 0, protected = 0;
    *payload = NULL;
    int offset = 20;
    while (offset < end) {
        if (offset + 4 > end)
            return -1;
        unsigned type = get16(d + offset), len = get16(d + offset + 2);
        int value_end = offset + 4 + (int)len, pad = (int)(-len & 3);
        if (value_end > end)
            return -1;
        if (type == ATTR_FINGERPRINT) {
            if (value_end + pad != end || len != 4 ||
                get32(d + offset + 4) != (crc32(d, (size_t)offset) ^ FINGERPRINT_XOR))
                return -1;
        } else if (protected) {
        } else if (type == ATTR_XOR_PEER_ADDRESS) {
            if (!xpeer) {
                xpeer = d + offset + 4;
                xpeer_len = (int)len;
            }
        } else if (type == ATTR_DATA) {
            if (!*payload) {
                *payload = d + offset + 4;
                *payload_len = (int)len;
            }
        } else if (type == ATTR_MESSAGE_INTEGRITY || type == ATTR_MESSAGE_INTEGRITY_SHA256) {
            protected = 1;
        }
        offset = value_end + pad;
    }
    if (!xpeer || !*payload || xpeer_len < 4 || xpeer[0] != 0)
        return -1;
    unsigned char mask[16];
    put32(mask, MAGIC_COOKIE);
    memcpy(mask + 4, d + 8, 12);
    memset(peer, 0, sizeof *peer);
    if (xpeer[1] == 1 && xpeer_len == 8)
        peer->family = 4;
    else if (xpeer[1] == 2 && xpeer_len == 20)
        peer->family = 6;
    else
        return -1;
    peer->port = (uint16_t)(get16(xpeer + 2) ^ (MAGIC_COOKIE >> 16));
    for (int i = 0; i < xpeer_len - 4; i++)
        peer->ip[i] = xpeer[4 + i] ^ mask[i];
    return 0;
}

static const unsigned char *next_tid(dp_t *dp)
{
    if (dp->tid_offset >= (int)sizeof dp->tids) {
        size_t got = 0;
        while (got < sizeof dp->tids) {
            ssize_t n = getrandom(dp->tids + got, sizeof dp->tids - got, 0);
            if (n > 0)
                got += (size_t)n;
            else if (errno != EINTR)
                abort(); /* no randomness: guessable transaction ids are worse than a crash */
        }
        dp->tid_offset = 0;
    }
    const unsigned char *tid = dp->tids + dp->tid_offset;
    dp->tid_offset += 12;
    return tid;
}

/* -- sending -------------------------------------------------------------------------------- */

/* Datagrams out[i] for i in `which` (count of them), one sendmmsg per run of one socket. */
static void send_each(dp_t *dp, const int *which, int count)
{
    struct out *o = &dp->out;
    struct mmsghdr msgs[BATCH];
    for (int i = 0; i < count;) {
        int fd = o->fd[which[i]], run = 0;
        while (i + run < count && o->fd[which[i + run]] == fd) {
            msgs[run] = o->msg[which[i + run]];
            run++;
        }
        for (int done = 0; done < run;) {
            int sent = fd < 0 ? -1 : sendmmsg(fd, msgs + done, (unsigned)(run - done), 0);
            if (sent < 1) {
                dp->stats[DP_STAT_SEND_ERRORS] += 1; /* skip the one refused, try the rest */
                sent = 1;
            }
            done += sent;
        }
        i += run;
    }
}

static int same_flow(const struct out *o, int i, int j)
{
    return o->fd[i] == o->fd[j] && o->msg[i].msg_hdr.msg_namelen == o->msg[j].msg_hdr.msg_namelen &&
           memcmp(&o->to[i], &o->to[j], o->msg[i].msg_hdr.msg_namelen) == 0;
}

/* Sort the batch into groups (see struct out), each one message of o->gmsg. */
static void group(struct out *o)
{
    int opener[BATCH], open[BATCH]; /* per group: its first datagram; 1 while one may join */
    o->ngroups = 0;
    for (int i = 0; i < o->n; i++) {
        int g = o->ngroups - 1;
        while (g >= 0 && !same_flow(o, opener[g], i))
            g--; /* this flow's latest group */
        int size = g >= 0 ? o->len[opener[g]] : 0;
        if (g >= 0 && open[g] && o->len[i] > 0 && o->len[i] <= size &&
            o->count[g] < GSO_MAX_SEGMENTS && o->bytes[g] + o->len[i] <= GSO_MAX_BYTES) {
            o->count[g]++;
            o->bytes[g] += o->len[i];
            open[g] = o->len[i] == size; /* a shorter one ends it: the kernel cuts equal sizes */
        } else {
            g = o->ngroups++;
            opener[g] = i;
            open[g] = o->len[i] > 0; /* a segment size of 0 would mean no GSO */
            o->count[g] = 1;
            o->bytes[g] = o->len[i];
        }
        o->group_of[i] = g;
    }
    int filled[BATCH];
    for (int g = 0, offset = 0; g < o->ngroups; offset += o->count[g], g++) {
        o->first[g] = offset;
        filled[g] = 0;
    }
    for (int i = 0; i < o->n; i++) {
        int g = o->group_of[i];
        o->order[o->first[g] + filled[g]++] = i;
    }
    int niov = 0;
    for (int g = 0; g < o->ngroups; g++) {
        const int *members = o->order + o->first[g];
        struct msghdr *h = &o->gmsg[g].msg_hdr;
        *h = o->msg[members[0]].msg_hdr;
        if (o->count[g] == 1)
            continue;
        h->msg_iov = o->giov + niov;
        h->msg_iovlen = 0;
        for (int k = 0; k < o->count[g]; k++) {
            const struct msghdr *m = &o->msg[members[k]].msg_hdr;
            memcpy(o->giov + niov, m->msg_iov, m->msg_iovlen * sizeof *m->msg_iov);
            niov += (int)m->msg_iovlen;
            h->msg_iovlen += m->msg_iovlen;
        }
        h->msg_control = o->gctl[g].buf;
        h->msg_controllen = sizeof o->gctl[g].buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(h);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t segment = (uint16_t)o->len[members[0]];
        memcpy(CMSG_DATA(cm), &segment, sizeof segment);
    }
}

static void flush(dp_t *dp)
{
    struct out *o = &dp->out;
    if (!dp->gso) {
        int all[BATCH];
        for (int i = 0; i < o->n; i++)
            all[i] = i;
        send_each(dp, all, o->n);
        o->n = 0;
        return;
    }
    group(o);
    for (int g = 0; g < o->ngroups;) {
        int fd = o->fd[o->order[o->first[g]]], run = 1;
        while (g + run < o->ngroups && o->fd[o->order[o->first[g + run]]] == fd)
            run++;
        int sent = fd < 0 ? -1 : sendmmsg(fd, &o->gmsg[g], (unsigned)run, 0);
        for (int k = 0; k < sent; k++)
            dp->stats[DP_STAT_GSO_SENDS] += o->count[g + k] > 1;
        if (sent < 1) {
            /* Group g refused: it goes again datagram by datagram, so GSO never loses what
             * plain sends relay.  A refusal of GSO itself (a kernel or socket without it)
             * turns it off; a full buffer or a segment over the path's MTU does not. */
            if (o->count[g] > 1 && fd >= 0 && errno != EAGAIN && errno != EMSGSIZE) {
                dp->gso = 0;
                dp->stats[DP_STAT_GSO_REFUSED] += 1;
            }
            send_each(dp, o->order + o->first[g], o->count[g]);
            sent = 1;
        }
        g += sent;
    }
    o->n = 0;
}

/* Queue one datagram out: `head` (copied), then `payload` (where it lies, until the flush),
 * then `pad` bytes of padding. */
static void emit(dp_t *dp, int fd, const struct addr *to, const unsigned char *head, int head_len,
                 const unsigned char *payload, int payload_len, int pad)
{
    struct out *o = &dp->out;
    int i = o->n++;
    int niov = 0;
    o->fd[i] = fd;
    if (head_len) {
        memcpy(o->head[i], head, (size_t)head_len);
        o->iov[i][niov++] = (struct iovec){o->head[i], (size_t)head_len};
    }
    o->iov[i][niov++] = (struct iovec){(void *)payload, (size_t)payload_len};
    if (pad)
        o->iov[i][niov++] = (struct iovec){(void *)PADDING, (size_t)pad};
    memset(&o->msg[i], 0, sizeof o->msg[i]);
    o->msg[i].msg_hdr.msg_name = &o->to[i];
    o->msg[i].msg_hdr.msg_namelen = to_sockaddr(to, &o->to[i]);
    o->msg[i].msg_hdr.msg_iov = o->iov[i];
    o->msg[i].msg_hdr.msg_iovlen = (size_t)niov;
    o->len[i] = head_len + payload_len + pad;
    dp->stats[DP_STAT_FORWARDED] += 1;
    if (o->n == BATCH)
        flush(dp);
}

/* -- the forwarding rules ------------------------------------------------------------------- */

static void to_python(dp_t *dp, int listener, const struct addr *src, const unsigned char *data,
                      int len)
{
    if (dp->qlen >= dp->qcap) {
        dp->stats[DP_STAT_QUEUE_DROPPED] += 1;
        return;
    }
    struct qitem *item = malloc(sizeof *item + (size_t)len);
    if (!item) {
        dp->stats[DP_STAT_QUEUE_DROPPED] += 1;
        return;
    }
    item->listener = listener;
    item->src = *src;
    item->len = len;
    memcpy(item->data, data, (size_t)len);
    dp->queue[(dp->qhead + dp->qlen++) % dp->qcap] = item;
    dp->stats[DP_STAT_QUEUED] += 1;
    if (dp->qlen == 1 && dp->eventfd >= 0) {
        uint64_t one = 1;
        if (write(dp->eventfd, &one, sizeof one) < 0) {
            /* the counter is already set: Python will read the queue */
        }
    }
}

/* ChannelData from the client: as Allocation.from_client_channel. */
static void channel_from_client(dp_t *dp, struct dp_alloc *a, const unsigned char *d, int len)
{
    struct chan *c = find_chan(a, (int)get16(d));
    int size = (int)get16(d + 2);
    if (!c || size > len - 4 || !find_perm(a, c->peer.family, c->peer.ip) ||
        a->relay[c->peer.family == 4 ? 0 : 1].fd < 0) {
        dp->stats[DP_STAT_DROPPED] += 1;
        return;
    }
    if (!spend(a, size))
        return;
    a->counters[DP_BYTES_FROM_CLIENT] += (unsigned long long)size;
    a->counters[DP_PACKETS_FROM_CLIENT] += 1;
    emit(dp, a->relay[c->peer.family == 4 ? 0 : 1].fd, &c->peer, NULL, 0, d + 4, size, 0);
}

/* A Send indication from the client: as Allocation.from_client_send, except that one to a
 * peer Python must judge (one of our own ports, a relay-only peer) goes to Python. */
static void send_from_client(dp_t *dp, struct dp_alloc *a, const struct addr *src,
                             const unsigned char *d, int len)
{
    struct addr peer;
    const unsigned char *payload = NULL;
    int size = 0;
    if (parse_send(d, len, &peer, &payload, &size) < 0) {
        dp->stats[DP_STAT_DROPPED] += 1;
        return;
    }
    int fd = a->relay[peer.family == 4 ? 0 : 1].fd;
    struct perm *p = find_perm(a, peer.family, peer.ip);
    if (fd < 0 || !p) {
        dp->stats[DP_STAT_DROPPED] += 1;
        return;
    }
    if (!p->native_send || (dp->own_ports[peer.port >> 3] & (1 << (peer.port & 7)))) {
        to_python(dp, a->listener, src, d, len);
        return;
    }
    if (!spend(a, size))
        return;
    a->counters[DP_BYTES_FROM_CLIENT] += (unsigned long long)size;
    a->counters[DP_PACKETS_FROM_CLIENT] += 1;
    emit(dp, fd, &peer, NULL, 0, payload, size, 0);
}

static void from_client(dp_t *dp, int listener, const struct addr *src, const unsigned char *d,
                        int len)
{
    int relayed_kind = len >= 4 && ((d[0] >= 0x40 && d[0] < 0x80) ||
                                    (d[0] == 0 && d[1] == SEND_INDICATION));
    /* Without an allocation here, Python's: it may hold one (a rate-limited one stays there). */
    struct dp_alloc *a = relayed_kind ? lookup(dp, listener, src) : NULL;
    if (!a)
        to_python(dp, listener, src, d, len);
    else if (d[0])
        channel_from_client(dp, a, d, len);
    else
        send_from_client(dp, a, src, d, len);
}

/* A datagram on a relay socket: as Allocation.from_peer (UDP clients: no padding). */
static void from_peer(dp_t *dp, struct dp_alloc *a, const struct addr *peer,
                      const unsigned char *d, int size)
{
    if (!find_perm(a, peer->family, peer->ip)) {
        dp->stats[DP_STAT_DROPPED] += 1;
        return;
    }
    if (!spend(a, size))
        return;
    int fd = dp->listeners[a->listener].used ? dp->listeners[a->listener].sock.fd : -1;
    struct chan *c = find_chan_of_peer(a, peer);
    unsigned char head[48];
    int head_len, pad = 0;
    if (c) {
        put16(head, (unsigned)c->number);
        put16(head + 2, (unsigned)size);
        head_len = 4;
    } else {
        const unsigned char *tid = next_tid(dp);
        int ip_len = ip_len_of(peer), value_len = 4 + ip_len;
        pad = -size & 3;
        put16(head, DATA_INDICATION);
        put16(head + 2, (unsigned)(4 + value_len + 4 + size + pad));
        put32(head + 4, MAGIC_COOKIE);
        memcpy(head + 8, tid, 12);
        put16(head + 20, ATTR_XOR_PEER_ADDRESS);
        put16(head + 22, (unsigned)value_len);
        head[24] = 0;
        head[25] = peer->family == 4 ? 1 : 2;
        put16(head + 26, peer->port ^ (MAGIC_COOKIE >> 16));
        for (int i = 0; i < ip_len; i++)
            head[28 + i] = peer->ip[i] ^ head[4 + i]; /* the cookie, then the transaction id */
        put16(head + 28 + ip_len, ATTR_DATA);
        put16(head + 30 + ip_len, (unsigned)size);
        head_len = 32 + ip_len;
    }
    a->counters[DP_BYTES_TO_CLIENT] += (unsigned long long)size;
    a->counters[DP_PACKETS_TO_CLIENT] += 1;
    emit(dp, fd, &a->client, head, head_len, d, size, pad);
}

/* -- the thread ----------------------------------------------------------------------------- */

static void read_socket(dp_t *dp, struct dsock *s)
{
    for (int round = 0; round < ROUNDS; round++) {
        if (s->kind == K_RELAY ? s->alloc->dead : !dp->listeners[s->listener].used)
            return;
        for (int i = 0; i < BATCH; i++) {
            dp->riov[i] = (struct iovec){dp->rbuf + (size_t)i * MAX_DATAGRAM, MAX_DATAGRAM};
            memset(&dp->rmsg[i].msg_hdr, 0, sizeof dp->rmsg[i].msg_hdr);
            dp->rmsg[i].msg_hdr.msg_name = &dp->rfrom[i];
            dp->rmsg[i].msg_hdr.msg_namelen = sizeof dp->rfrom[i];
            dp->rmsg[i].msg_hdr.msg_iov = &dp->riov[i];
            dp->rmsg[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(s->fd, dp->rmsg, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            return; /* EAGAIN, or an ICMP error reported on the socket: nothing to do */
        dp->stats[DP_STAT_RECEIVED] += (unsigned long long)n;
        for (int i = 0; i < n; i++) {
            struct addr src;
            if (dp->rmsg[i].msg_hdr.msg_flags & MSG_TRUNC || from_sockaddr(&src, &dp->rfrom[i]))
                continue;
            const unsigned char *d = dp->riov[i].iov_base;
            int len = (int)dp->rmsg[i].msg_len;
            if (s->kind == K_RELAY)
                from_peer(dp, s->alloc, &src, d, len);
            else
                from_client(dp, s->listener, &src, d, len);
        }
        flush(dp); /* before the buffers are read into again */
        if (n < BATCH)
            return;
    }
}

static void free_alloc(struct dp_alloc *a)
{
    dp_budget_release(a->budget);
    dp_budget_release(a->account);
    free(a->perms);
    free(a->chans);
    free(a);
}

static void *run(void *arg)
{
    dp_t *dp = arg;
    struct epoll_event events[64];
    for (;;) {
        pthread_mutex_lock(&dp->lock);
        while (dp->garbage) {
            struct dp_alloc *a = dp->garbage;
            dp->garbage = a->next;
            free_alloc(a);
        }
        int stopping = dp->stopping;
        pthread_mutex_unlock(&dp->lock);
        if (stopping)
            return NULL;
        int n = epoll_wait(dp->epfd, events, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        pthread_mutex_lock(&dp->lock);
        for (int i = 0; i < n; i++) {
            struct dsock *s = events[i].data.ptr;
            if (s->kind == K_WAKE) {
                uint64_t value;
                if (read(dp->wakefd, &value, sizeof value) < 0) {
                    /* already read */
                }
            } else {
                read_socket(dp, s);
            }
        }
        pthread_mutex_unlock(&dp->lock);
    }
}

/* -- the interface -------------------------------------------------------------------------- */

static int watch(dp_t *dp, struct dsock *s)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    return epoll_ctl(dp->epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0 ? -errno : 0;
}

/* Whether this kernel takes UDP_SEGMENT (Linux 4.18+): asked once, of a socket of our own. */
static int gso_available(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), segment = 1200;
    if (fd < 0)
        return 0;
    int ok = setsockopt(fd, SOL_UDP, UDP_SEGMENT, &segment, sizeof segment) == 0;
    close(fd);
    return ok;
}

dp_t *dp_new(int queue_capacity)
{
    pthread_once(&crc_once, crc_init);
    if (queue_capacity < 1)
        return NULL;
    dp_t *dp = calloc(1, sizeof *dp);
    if (!dp)
        return NULL;
    pthread_mutex_init(&dp->lock, NULL);
    dp->epfd = epoll_create1(EPOLL_CLOEXEC);
    dp->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    dp->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    dp->nbuckets = 64;
    dp->buckets = calloc(dp->nbuckets, sizeof *dp->buckets);
    dp->qcap = queue_capacity;
    dp->queue = calloc((size_t)queue_capacity, sizeof *dp->queue);
    dp->rbuf = malloc((size_t)BATCH * MAX_DATAGRAM);
    dp->tid_offset = (int)sizeof dp->tids;
    dp->gso = gso_available();
    dp->wake = (struct dsock){.kind = K_WAKE, .fd = dp->wakefd};
    if (dp->epfd < 0 || dp->wakefd < 0 || dp->eventfd < 0 || !dp->buckets || !dp->queue ||
        !dp->rbuf || watch(dp, &dp->wake) < 0) {
        dp_free(dp);
        return NULL;
    }
    return dp;
}

int dp_start(dp_t *dp)
{
    pthread_mutex_lock(&dp->lock);
    int err = dp->started ? -EALREADY : -pthread_create(&dp->thread, NULL, run, dp);
    if (!err)
        dp->started = 1;
    pthread_mutex_unlock(&dp->lock);
    return err;
}

void dp_free(dp_t *dp)
{
    if (!dp)
        return;
    pthread_mutex_lock(&dp->lock);
    dp->stopping = 1;
    int started = dp->started;
    pthread_mutex_unlock(&dp->lock);
    if (started) {
        uint64_t one = 1;
        if (write(dp->wakefd, &one, sizeof one) < 0) {
            /* the thread is already woken */
        }
        pthread_join(dp->thread, NULL);
    }
    for (unsigned i = 0; dp->buckets && i < dp->nbuckets; i++) {
        struct dp_alloc *a = dp->buckets[i], *next;
        for (; a; a = next) {
            next = a->next;
            free_alloc(a);
        }
    }
    while (dp->garbage) {
        struct dp_alloc *a = dp->garbage;
        dp->garbage = a->next;
        free_alloc(a);
    }
    for (int i = 0; dp->queue && i < dp->qlen; i++)
        free(dp->queue[(dp->qhead + i) % dp->qcap]);
    for (int fd, i = 0; i < 3; i++)
        if ((fd = (int[]){dp->epfd, dp->wakefd, dp->eventfd}[i]) >= 0)
            close(fd);
    free(dp->buckets);
    free(dp->queue);
    free(dp->rbuf);
    pthread_mutex_destroy(&dp->lock);
    free(dp);
}

int dp_event_fd(dp_t *dp)
{
    return dp->eventfd;
}

int dp_gso(dp_t *dp, int enable)
{
    pthread_mutex_lock(&dp->lock);
    if (enable == 0)
        dp->gso = 0;
    else if (enable > 0)
        dp->gso = gso_available();
    int on = dp->gso;
    pthread_mutex_unlock(&dp->lock);
    return on;
}

int dp_add_listener(dp_t *dp, int fd)
{
    pthread_mutex_lock(&dp->lock);
    int id = -ENOSPC;
    for (int i = 0; i < MAX_LISTENERS; i++) {
        if (!dp->listeners[i].used) {
            dp->listeners[i].sock = (struct dsock){.kind = K_LISTENER, .fd = fd, .listener = i};
            int err = fd >= 0 ? watch(dp, &dp->listeners[i].sock) : 0;
            if (err < 0) {
                id = err;
            } else {
                dp->listeners[i].used = 1;
                id = i;
            }
            break;
        }
    }
    pthread_mutex_unlock(&dp->lock);
    return id;
}

int dp_remove_listener(dp_t *dp, int listener)
{
    if (listener < 0 || listener >= MAX_LISTENERS)
        return -EINVAL;
    pthread_mutex_lock(&dp->lock);
    int err = -ENOENT;
    struct listener *l = &dp->listeners[listener];
    if (l->used) {
        if (l->sock.fd >= 0)
            epoll_ctl(dp->epfd, EPOLL_CTL_DEL, l->sock.fd, NULL);
        l->used = 0;
        err = 0;
    }
    pthread_mutex_unlock(&dp->lock);
    return err;
}

void dp_set_own_port(dp_t *dp, int port, int own)
{
    if (port < 0 || port > 65535)
        return;
    pthread_mutex_lock(&dp->lock);
    if (own)
        dp->own_ports[port >> 3] |= (uint8_t)(1 << (port & 7));
    else
        dp->own_ports[port >> 3] &= (uint8_t)~(1 << (port & 7));
    pthread_mutex_unlock(&dp->lock);
}

dp_budget_t *dp_budget_new(void)
{
    dp_budget_t *b = calloc(1, sizeof *b);
    if (b) {
        b->bytes = b->packets = UNLIMITED;
        b->refs = 1;
    }
    return b;
}

/* Budget.refill: a debt (a negative balance) is paid from the new second's budget.  A spend
 * between the read and the write is not lost: the write retries. */
static void refill_field(long long *field, long long per_second)
{
    long long old = balance(field), fresh;
    do
        fresh = (old < 0 ? old : 0) + (per_second > 0 ? per_second : UNLIMITED);
    while (!__atomic_compare_exchange_n(field, &old, fresh, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
}

void dp_budget_refill(dp_budget_t *b, long long bandwidth, long long packet_rate)
{
    refill_field(&b->bytes, bandwidth);
    refill_field(&b->packets, packet_rate);
}

int dp_budget_affords(dp_budget_t *b, long long size)
{
    return affords(b, size);
}

void dp_budget_charge(dp_budget_t *b, long long size)
{
    charge(b, size);
}

static void hold(dp_budget_t *b)
{
    if (b)
        __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
}

void dp_budget_release(dp_budget_t *b)
{
    if (b && __atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(b);
}

dp_alloc_t *dp_alloc_add(dp_t *dp, int listener, const unsigned char *ip, int ip_len, int port,
                         int relay4_fd, int relay6_fd, dp_budget_t *budget,
                         dp_budget_t *account_budget)
{
    struct addr client;
    if (listener < 0 || listener >= MAX_LISTENERS || make_addr(&client, ip, ip_len, port) < 0)
        return NULL;
    struct dp_alloc *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->listener = listener;
    a->client = client;
    a->budget = budget;
    a->account = account_budget;
    int fds[2] = {relay4_fd, relay6_fd};
    for (int i = 0; i < 2; i++)
        a->relay[i] = (struct dsock){.kind = K_RELAY, .fd = fds[i], .listener = listener, .alloc = a};
    pthread_mutex_lock(&dp->lock);
    int err = 0;
    if (!dp->listeners[listener].used || lookup(dp, listener, &client))
        err = -EEXIST;
    if (!err && dp->nallocs >= dp->nbuckets)
        err = grow(dp);
    for (int i = 0; !err && i < 2; i++) {
        if (fds[i] >= 0 && (err = watch(dp, &a->relay[i])) < 0 && i == 1 && fds[0] >= 0)
            epoll_ctl(dp->epfd, EPOLL_CTL_DEL, fds[0], NULL);
    }
    if (!err) {
        unsigned b = hash_key(listener, &client) & (dp->nbuckets - 1);
        a->next = dp->buckets[b];
        dp->buckets[b] = a;
        dp->nallocs++;
        hold(budget); /* released with the allocation, by free_alloc */
        hold(account_budget);
    }
    pthread_mutex_unlock(&dp->lock);
    if (err) {
        free(a);
        return NULL;
    }
    return a;
}

/* Stops reading its relay sockets (Python closes them after this returns) and forgets it,
 * filling `last` with what it counted since the last dp_take_counters: its memory is freed by
 * the thread before its next wait (or by dp_free), so the handle is not used after this. */
void dp_alloc_remove(dp_t *dp, dp_alloc_t *a, unsigned long long *last)
{
    pthread_mutex_lock(&dp->lock);
    memcpy(last, a->counters, sizeof a->counters);
    unsigned b = hash_key(a->listener, &a->client) & (dp->nbuckets - 1);
    struct dp_alloc **p = &dp->buckets[b];
    while (*p && *p != a)
        p = &(*p)->next;
    if (*p) {
        *p = a->next;
        dp->nallocs--;
        for (int i = 0; i < 2; i++)
            if (a->relay[i].fd >= 0)
                epoll_ctl(dp->epfd, EPOLL_CTL_DEL, a->relay[i].fd, NULL);
        a->dead = 1;
        a->next = dp->garbage;
        dp->garbage = a;
        if (!dp->started) {
            dp->garbage = a->next;
            free_alloc(a);
        }
    }
    pthread_mutex_unlock(&dp->lock);
}

/* Room for one more entry in a table of `count` entries of `size` bytes: 0 or -ENOMEM. */
static int room_for_one(void **table, int count, int *capacity, size_t size)
{
    if (count < *capacity)
        return 0;
    int grown = *capacity ? *capacity * 2 : 4;
    void *bigger = realloc(*table, (size_t)grown * size);
    if (!bigger)
        return -ENOMEM;
    *table = bigger;
    *capacity = grown;
    return 0;
}

int dp_permit(dp_t *dp, dp_alloc_t *a, const unsigned char *ip, int ip_len, int native_send)
{
    struct addr peer;
    if (make_addr(&peer, ip, ip_len, 0) < 0)
        return -EINVAL;
    pthread_mutex_lock(&dp->lock);
    int err = 0;
    struct perm *p = find_perm(a, peer.family, peer.ip);
    if (!p) {
        err = room_for_one((void **)&a->perms, a->nperm, &a->capperm, sizeof *a->perms);
        if (!err) {
            p = &a->perms[a->nperm++];
            p->family = peer.family;
            memcpy(p->ip, peer.ip, 16);
        }
    }
    if (p)
        p->native_send = native_send != 0;
    pthread_mutex_unlock(&dp->lock);
    return err;
}

int dp_unpermit(dp_t *dp, dp_alloc_t *a, const unsigned char *ip, int ip_len)
{
    struct addr peer;
    if (make_addr(&peer, ip, ip_len, 0) < 0)
        return -EINVAL;
    pthread_mutex_lock(&dp->lock);
    struct perm *p = find_perm(a, peer.family, peer.ip);
    if (p)
        *p = a->perms[--a->nperm];
    pthread_mutex_unlock(&dp->lock);
    return p ? 0 : -ENOENT;
}

int dp_bind_channel(dp_t *dp, dp_alloc_t *a, int number, const unsigned char *ip, int ip_len,
                    int port)
{
    struct addr peer;
    if (number < 0x4000 || number > 0x7FFF || make_addr(&peer, ip, ip_len, port) < 0)
        return -EINVAL;
    pthread_mutex_lock(&dp->lock);
    int err = 0;
    struct chan *c = find_chan(a, number);
    if (!c) {
        err = room_for_one((void **)&a->chans, a->nchan, &a->capchan, sizeof *a->chans);
        if (!err) {
            c = &a->chans[a->nchan++];
            c->number = number;
        }
    }
    if (c)
        c->peer = peer;
    pthread_mutex_unlock(&dp->lock);
    return err;
}

int dp_unbind_channel(dp_t *dp, dp_alloc_t *a, int number)
{
    pthread_mutex_lock(&dp->lock);
    struct chan *c = find_chan(a, number);
    if (c)
        *c = a->chans[--a->nchan];
    pthread_mutex_unlock(&dp->lock);
    return c ? 0 : -ENOENT;
}

void dp_take_counters(dp_t *dp, dp_alloc_t *a, unsigned long long *out)
{
    pthread_mutex_lock(&dp->lock);
    memcpy(out, a->counters, sizeof a->counters);
    memset(a->counters, 0, sizeof a->counters);
    pthread_mutex_unlock(&dp->lock);
}

int dp_catch_up(dp_t *dp, int listener)
{
    pthread_mutex_lock(&dp->lock);
    if (listener >= 0 && listener < MAX_LISTENERS && dp->listeners[listener].used)
        read_socket(dp, &dp->listeners[listener].sock);
    int queued = dp->qlen;
    pthread_mutex_unlock(&dp->lock);
    return queued;
}

/* The oldest datagram for Python: its length, or -1 when the queue is empty, or -2 (and the
 * datagram dropped, counted) when it does not fit `capacity`. */
int dp_pop(dp_t *dp, unsigned char *buf, int capacity, int *listener, unsigned char *ip,
           int *ip_len, int *port)
{
    pthread_mutex_lock(&dp->lock);
    struct qitem *item = NULL;
    if (dp->qlen) {
        item = dp->queue[dp->qhead];
        dp->qhead = (dp->qhead + 1) % dp->qcap;
        dp->qlen--;
    }
    if (!dp->qlen) {
        uint64_t value;
        if (read(dp->eventfd, &value, sizeof value) < 0) {
            /* not set: nothing to clear */
        }
    }
    pthread_mutex_unlock(&dp->lock);
    if (!item)
        return -1;
    int len = item->len;
    if (len > capacity) {
        len = -2;
    } else {
        memcpy(buf, item->data, (size_t)len);
        *listener = item->listener;
        *ip_len = ip_len_of(&item->src);
        memcpy(ip, item->src.ip, (size_t)*ip_len);
        *port = item->src.port;
    }
    free(item);
    return len;
}

void dp_stats(dp_t *dp, unsigned long long *out)
{
    pthread_mutex_lock(&dp->lock);
    memcpy(out, dp->stats, sizeof dp->stats);
    pthread_mutex_unlock(&dp->lock);
}

void dp_inject(dp_t *dp, int from_peer_side, int listener, dp_alloc_t *alloc,
               const unsigned char *ip, int ip_len, int port, const unsigned char *data, int len)
{
    struct addr src;
    if (len < 0 || make_addr(&src, ip, ip_len, port) < 0)
        return;
    pthread_mutex_lock(&dp->lock);
    if (from_peer_side) {
        if (alloc && !alloc->dead)
            from_peer(dp, alloc, &src, data, len);
    } else if (listener >= 0 && listener < MAX_LISTENERS && dp->listeners[listener].used) {
        from_client(dp, listener, &src, data, len);
    }
    flush(dp);
    pthread_mutex_unlock(&dp->lock);
}

int dp_parse_send(const unsigned char *data, int len, unsigned char *ip, int *ip_len, int *port,
                  int *payload_offset, int *payload_len)
{
    struct addr peer;
    const unsigned char *payload;
    pthread_once(&crc_once, crc_init); /* dp_new's work, for a caller that made no data plane */
    if (len < 0 || parse_send(data, len, &peer, &payload, payload_len) < 0)
        return -1;
    *ip_len = ip_len_of(&peer);
    memcpy(ip, peer.ip, (size_t)*ip_len);
    *port = peer.port;
    *payload_offset = (int)(payload - data);
    return 0;
}
