/* A TURN load generator for bench/compare.py: the transports in C, the TURN logic in Python.
 *
 * Python (bench/compare.py, with relay.proto.stun) drives the setup over stdin/stdout: it builds each
 * request, this program sends it on one of its connections and returns the response.  Then
 * Python hands over one frame template per connection (a ChannelData header or a Send
 * indication's header and attributes) and asks for a paced run: this program sends
 * `rate` frames a second, spread over the connections, each carrying a sequence number and a
 * send time, reads the echoes relayed back, and reports how many came back and their
 * round-trip times.  Loopback only, bounded in time: every run and every wait has an end.
 *
 * One mode is all C: Allocate+Refresh(0) cycles, each by a new UDP client, so that the load
 * costs a small part of what the servers' answers cost (60-80 us of CPU a cycle, against
 * 120-540 us for the servers) and two worker processes can be measured on a two-core machine.
 *
 *   loadgen udp|tcp|tls HOST PORT NCONN
 *   stdin:  "X idx len\n" + bytes   send one request, answer "len\n" + the response (0: none)
 *           "T idx len\n" + bytes   the template for connection idx
 *           "R rate seconds size\n" a paced run; answers "sent received p50_us p99_us max_us\n"
 *           "A clients warmup seconds keyhex user realm\n"
 *                                   Allocate+Refresh(0) cycles (UDP): answers "W\n" after the
 *                                   warm-up, then "cycles errors elapsed_ns\n"
 *           "Q\n"                    quit
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { UDP, TCP, TLS };
#define MAXCONN 4096
#define BUF 65536
#define HIST_US 200000 /* RTTs at 1 us resolution up to 200 ms; later ones count as the max */

typedef struct {
    int fd;
    SSL *ssl;
    unsigned char tmpl[512];
    int tmpl_len;
    unsigned char in[BUF * 2]; /* stream reassembly */
    int in_len;
} conn_t;

static int transport, nconn;
static conn_t *conns;
static uint32_t run_id;
static uint64_t received, hist[HIST_US + 1];

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void set_nonblocking(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void wait_fd(int fd, short events, int ms) {
    struct pollfd p = {fd, events, 0};
    poll(&p, 1, ms);
}

/* Write all of buf, waiting when the socket is full: the server never blocks on us. */
static void send_frame(conn_t *c, const unsigned char *buf, int len) {
    if (transport == UDP) {
        if (send(c->fd, buf, len, 0) < 0 && errno != EAGAIN && errno != ECONNREFUSED)
            die("send");
        return;
    }
    int off = 0;
    while (off < len) {
        int n;
        if (transport == TLS) {
            n = SSL_write(c->ssl, buf + off, len - off);
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, n);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    wait_fd(c->fd, POLLOUT | POLLIN, 10);
                    continue;
                }
                fprintf(stderr, "SSL_write failed\n");
                exit(2);
            }
        } else {
            n = send(c->fd, buf + off, len - off, 0);
            if (n < 0) {
                if (errno == EAGAIN) {
                    wait_fd(c->fd, POLLOUT, 10);
                    continue;
                }
                die("send");
            }
        }
        off += n;
    }
}

/* Read what is there into c->in (streams) or one datagram; returns bytes read, 0 if none. */
static int read_some(conn_t *c, unsigned char *dgram) {
    int n;
    if (transport == UDP) {
        n = recv(c->fd, dgram, BUF, 0);
        return n < 0 ? 0 : n;
    }
    int room = (int)sizeof(c->in) - c->in_len;
    if (transport == TLS) {
        n = SSL_read(c->ssl, c->in + c->in_len, room);
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
            fprintf(stderr, "connection closed by the server\n");
            exit(2);
        }
    } else {
        n = recv(c->fd, c->in + c->in_len, room, 0);
        if (n == 0) {
            fprintf(stderr, "connection closed by the server\n");
            exit(2);
        }
        if (n < 0) return 0;
    }
    c->in_len += n;
    return n;
}

/* Length of the first whole frame in a stream buffer, 0 if incomplete. */
static int stream_frame(const unsigned char *b, int len) {
    if (len < 4) return 0;
    int body = (b[2] << 8) | b[3], total;
    if (b[0] >= 0x40 && b[0] < 0x80)
        total = 4 + ((body + 3) & ~3);
    else
        total = 20 + body;
    return total <= len ? total : 0;
}

/* The relayed payload of a ChannelData message or a Data indication's DATA attribute. */
static const unsigned char *payload_of(const unsigned char *f, int len, int *plen) {
    if (len >= 4 && f[0] >= 0x40 && f[0] < 0x80) {
        *plen = (f[2] << 8) | f[3];
        return *plen <= len - 4 ? f + 4 : NULL;
    }
    int off = 20;
    while (off + 4 <= len) {
        int type = (f[off] << 8) | f[off + 1], alen = (f[off + 2] << 8) | f[off + 3];
        if (off + 4 + alen > len) return NULL;
        if (type == 0x0013) {
            *plen = alen;
            return f + off + 4;
        }
        off += 4 + ((alen + 3) & ~3);
    }
    return NULL;
}

static void count_echo(const unsigned char *f, int len, uint64_t now) {
    int plen;
    const unsigned char *p = payload_of(f, len, &plen);
    uint32_t id;
    uint64_t sent;
    if (p == NULL || plen < 12) return;
    memcpy(&id, p, 4);
    if (id != run_id) return; /* a straggler from an earlier run */
    memcpy(&sent, p + 4, 8);
    uint64_t us = (now - sent) / 1000;
    hist[us > HIST_US ? HIST_US : us]++;
    received++;
}

static void drain(conn_t *c, uint64_t now) {
    static unsigned char dgram[BUF];
    for (int i = 0; i < 256; i++) {
        int n = read_some(c, dgram);
        if (transport == UDP) {
            if (n == 0) return;
            count_echo(dgram, n, now);
            continue;
        }
        int off = 0, f;
        while ((f = stream_frame(c->in + off, c->in_len - off)) > 0) {
            count_echo(c->in + off, f, now);
            off += f;
        }
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
        if (n == 0 && (transport != TLS || !SSL_pending(c->ssl))) return;
    }
}

/* One request, one response (retransmitted over UDP); the response goes to stdout. */
static void exchange(conn_t *c, const unsigned char *req, int len) {
    static unsigned char dgram[BUF];
    for (int attempt = 0; attempt < 4; attempt++) {
        send_frame(c, req, len);
        uint64_t deadline = now_ns() + 2000000000ull;
        while (now_ns() < deadline) {
            if (transport != TLS || !SSL_pending(c->ssl)) wait_fd(c->fd, POLLIN, 50);
            int n = read_some(c, dgram);
            const unsigned char *f = dgram;
            if (transport != UDP) {
                n = stream_frame(c->in, c->in_len);
                f = c->in;
            }
            if (n <= 0) continue;
            int is_reply = f[0] < 0x40 && n >= 20 && memcmp(f + 8, req + 8, 12) == 0;
            if (is_reply) {
                printf("%d\n", n);
                fwrite(f, 1, n, stdout);
                fflush(stdout);
            }
            if (transport != UDP) {
                memmove(c->in, c->in + n, c->in_len - n);
                c->in_len -= n;
            }
            if (is_reply) return;
        }
        if (transport != UDP) break;
    }
    printf("0\n");
    fflush(stdout);
}

static void run(double rate, double seconds, int size) {
    static unsigned char frame[BUF];
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
    }
    run_id = (uint32_t)now_ns() | 1;
    received = 0;
    memset(hist, 0, sizeof hist);
    uint64_t sent = 0, start = now_ns(), end = start + (uint64_t)(seconds * 1e9);
    uint64_t drain_end = end + 1000000000ull;
    struct epoll_event evs[64];
    for (;;) {
        uint64_t now = now_ns();
        if (now >= drain_end) break;
        if (now < end) {
            uint64_t due = (uint64_t)((now - start) * rate / 1e9);
            for (int burst = 0; sent < due && burst < 4096; burst++, sent++) {
                conn_t *c = &conns[sent % nconn];
                int t = c->tmpl_len;
                memcpy(frame, c->tmpl, t);
                memset(frame + t, 0, size);
                memcpy(frame + t, &run_id, 4);
                uint64_t ts = now_ns();
                memcpy(frame + t + 4, &ts, 8);
                memcpy(frame + t + 12, &sent, 8);
                int len = t + size;
                if (transport != UDP && (c->tmpl[0] & 0xc0) == 0x40)
                    while (len & 3) frame[len++] = 0; /* ChannelData is padded on streams */
                send_frame(c, frame, len);
            }
        } else if (received >= sent) {
            break;
        }
        int pending_tls = 0;
        if (transport == TLS)
            for (int i = 0; i < nconn; i++) pending_tls |= SSL_pending(conns[i].ssl) > 0;
        /* Sleep a millisecond between bursts rather than spin: the echo peer shares our core. */
        int n = epoll_wait(ep, evs, 64, pending_tls ? 0 : 1);
        now = now_ns();
        for (int i = 0; i < n; i++) drain(&conns[evs[i].data.u32], now);
        if (pending_tls)
            for (int i = 0; i < nconn; i++) drain(&conns[i], now);
    }
    close(ep);
    uint64_t acc = 0, p50 = 0, p99 = 0, max = 0;
    for (int us = 0; us <= HIST_US; us++) {
        if (!hist[us]) continue;
        acc += hist[us];
        if (!p50 && acc * 2 >= received) p50 = us;
        if (!p99 && acc * 100 >= received * 99) p99 = us;
        max = us;
    }
    printf("%llu %llu %llu %llu %llu\n", (unsigned long long)sent, (unsigned long long)received,
           (unsigned long long)p50, (unsigned long long)p99, (unsigned long long)max);
    fflush(stdout);
}

/* -- Allocate+Refresh(0) cycles ----------------------------------------------------------- */

enum { ALLOCATE = 0x003, REFRESH = 0x004, MAX_CLIENTS = 1024 };

typedef struct {
    int fd, method, nonce_len;
    unsigned char msg[512];
    int len;
    char nonce[256];
    uint64_t sent_ns;
} cycler_t;

static struct sockaddr_in target;
static unsigned char cycle_key[16];
static char cycle_user[64], cycle_realm[64];

static int put_attr(unsigned char *m, int off, int type, const void *value, int len) {
    m[off] = type >> 8, m[off + 1] = type, m[off + 2] = len >> 8, m[off + 3] = len;
    memcpy(m + off + 4, value, len);
    int padded = (len + 3) & ~3;
    memset(m + off + 4 + len, 0, padded - len);
    return off + 4 + padded;
}

/* A request of `method` from client c: with credentials once it has a nonce. */
static void cycle_send(cycler_t *c, int method) {
    unsigned char *m = c->msg;
    static const unsigned char udp[4] = {17, 0, 0, 0}, zero[4] = {0, 0, 0, 0};
    m[0] = 0, m[1] = method;
    m[4] = 0x21, m[5] = 0x12, m[6] = 0xA4, m[7] = 0x42;
    for (int i = 8; i < 20; i++) m[i] = rand();
    int off = method == ALLOCATE ? put_attr(m, 20, 0x0019, udp, 4) : put_attr(m, 20, 0x000D, zero, 4);
    if (c->nonce_len) {
        off = put_attr(m, off, 0x0006, cycle_user, strlen(cycle_user));
        off = put_attr(m, off, 0x0014, cycle_realm, strlen(cycle_realm));
        off = put_attr(m, off, 0x0015, c->nonce, c->nonce_len);
        m[2] = (off + 4) >> 8, m[3] = off + 4; /* the length MESSAGE-INTEGRITY covers: with it */
        unsigned char mac[20];
        unsigned int mac_len;
        HMAC(EVP_sha1(), cycle_key, sizeof cycle_key, m, off, mac, &mac_len);
        off = put_attr(m, off, 0x0008, mac, 20);
    }
    m[2] = (off - 20) >> 8, m[3] = off - 20;
    c->len = off, c->method = method, c->sent_ns = now_ns();
    send(c->fd, m, off, 0);
}

/* A new client (socket) in c, added to `ep`, with no nonce yet. */
static void cycle_client(cycler_t *c, int ep) {
    c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&target, sizeof target) < 0) die("socket");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    c->nonce_len = 0;
}

static void cycle_replace(cycler_t *c, int ep) {
    close(c->fd); /* also leaves ep */
    cycle_client(c, ep);
}

/* The answer `r` (`n` bytes) to client c's request: the client's next step; 1 when a cycle ended,
 * -1 for an error answer, 0 otherwise. */
static int cycle_answer(cycler_t *c, int ep, const unsigned char *r, int n) {
    if (n < 20 || memcmp(r + 8, c->msg + 8, 12)) return 0;
    int type = (r[0] << 8) | r[1];
    if ((type & 0x0110) == 0x0100) { /* success */
        if (c->method == ALLOCATE) {
            cycle_send(c, REFRESH);
            return 0;
        }
        cycle_replace(c, ep);
        cycle_send(c, ALLOCATE);
        return 1;
    }
    int code = 0, nonce_len = -1;
    for (int off = 20; off + 4 <= n;) {
        int t = (r[off] << 8) | r[off + 1], len = (r[off + 2] << 8) | r[off + 3];
        if (off + 4 + len > n) break;
        if (t == 0x0009 && len >= 4) code = (r[off + 6] & 7) * 100 + r[off + 7];
        if (t == 0x0015 && len <= (int)sizeof c->nonce) {
            memcpy(c->nonce, r + off + 4, len);
            nonce_len = len;
        }
        off += 4 + ((len + 3) & ~3);
    }
    if ((code == 401 || code == 438) && nonce_len > 0) {
        c->nonce_len = nonce_len;
        cycle_send(c, c->method);
        return 0;
    }
    if (code == 437 && c->method == ALLOCATE) { /* a port whose allocation is not freed yet */
        cycle_replace(c, ep);
        cycle_send(c, ALLOCATE);
        return 0;
    }
    cycle_send(c, c->method);
    return -1;
}

static void cycles(int nclients, double warmup, double seconds) {
    static cycler_t clients[MAX_CLIENTS];
    int ep = epoll_create1(0);
    for (int i = 0; i < nclients; i++) {
        cycle_client(&clients[i], ep);
        cycle_send(&clients[i], ALLOCATE);
    }
    uint64_t start = now_ns(), end = start + (uint64_t)(warmup * 1e9), next_check = start;
    uint64_t done = 0, errors = 0;
    int measuring = 0;
    struct epoll_event events[64];
    static unsigned char r[2048];
    for (;;) {
        uint64_t now = now_ns();
        if (now >= end) {
            if (measuring) break;
            printf("W\n");
            fflush(stdout);
            measuring = 1, done = errors = 0, start = now_ns();
            end = start + (uint64_t)(seconds * 1e9);
        }
        if (now >= next_check) { /* UDP: retransmit what has waited a second */
            next_check = now + 100000000ull;
            for (int i = 0; i < nclients; i++)
                if (now - clients[i].sent_ns > 1000000000ull) {
                    clients[i].sent_ns = now;
                    send(clients[i].fd, clients[i].msg, clients[i].len, 0);
                }
        }
        int ready = epoll_wait(ep, events, 64, 100);
        for (int k = 0; k < ready; k++) {
            cycler_t *c = events[k].data.ptr;
            int n = recv(c->fd, r, sizeof r, 0);
            if (n <= 0) continue;
            int step = cycle_answer(c, ep, r, n);
            if (step > 0) done++;
            if (step < 0) errors++;
        }
    }
    uint64_t elapsed = now_ns() - start;
    for (int i = 0; i < nclients; i++) close(clients[i].fd);
    close(ep);
    printf("%llu %llu %llu\n", (unsigned long long)done, (unsigned long long)errors,
           (unsigned long long)elapsed);
    fflush(stdout);
}

static int read_exact(unsigned char *buf, int len) {
    return fread(buf, 1, len, stdin) == (size_t)len;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: loadgen udp|tcp|tls HOST PORT NCONN\n");
        return 2;
    }
    transport = !strcmp(argv[1], "udp") ? UDP : !strcmp(argv[1], "tcp") ? TCP : TLS;
    nconn = atoi(argv[4]);
    if (nconn < 1 || nconn > MAXCONN) return 2;
    struct sockaddr_in server = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &server.sin_addr) != 1 ||
        (ntohl(server.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen targets IPv4 loopback only\n");
        return 2;
    }
    SSL_CTX *ctx = NULL;
    if (transport == TLS) {
        ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION); /* turnrelay's default maximum */
    }
    conns = calloc(nconn, sizeof(conn_t));
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(AF_INET, transport == UDP ? SOCK_DGRAM : SOCK_STREAM, 0);
        if (c->fd < 0) die("socket");
        int big = 4 << 20, one = 1;
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
        setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        if (transport != UDP) setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(c->fd, (struct sockaddr *)&server, sizeof server) < 0) die("connect");
        if (transport == TLS) {
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            if (SSL_connect(c->ssl) != 1) {
                ERR_print_errors_fp(stderr);
                return 2;
            }
        }
        set_nonblocking(c->fd);
    }
    target = server;
    srand(getpid());
    printf("ready\n");
    fflush(stdout);
    char line[256];
    static unsigned char buf[BUF];
    while (fgets(line, sizeof line, stdin)) {
        int idx, len, size;
        double rate, seconds;
        if (sscanf(line, "X %d %d", &idx, &len) == 2 && idx < nconn && len <= BUF) {
            if (!read_exact(buf, len)) return 2;
            exchange(&conns[idx], buf, len);
        } else if (sscanf(line, "T %d %d", &idx, &len) == 2 && idx < nconn && len <= 512) {
            if (!read_exact(conns[idx].tmpl, len)) return 2;
            conns[idx].tmpl_len = len;
        } else if (sscanf(line, "R %lf %lf %d", &rate, &seconds, &size) == 3 && size >= 20 &&
                   size <= 1200 && seconds <= 60) {
            run(rate, seconds, size);
        } else if (line[0] == 'A') {
            int nclients;
            double warmup;
            char key_hex[33];
            if (sscanf(line, "A %d %lf %lf %32s %63s %63s", &nclients, &warmup, &seconds, key_hex,
                       cycle_user, cycle_realm) != 6 || nclients < 1 || nclients > MAX_CLIENTS ||
                warmup > 60 || seconds > 60 || strlen(key_hex) != 32) {
                fprintf(stderr, "bad command: %s", line);
                return 2;
            }
            for (int i = 0; i < 16; i++) sscanf(key_hex + 2 * i, "%2hhx", &cycle_key[i]);
            cycles(nclients, warmup, seconds);
        } else if (line[0] == 'Q') {
            return 0;
        } else {
            fprintf(stderr, "bad command: %s", line);
            return 2;
        }
    }
    return 0;
}
