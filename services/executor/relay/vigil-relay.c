/*
 * vigil-relay: the agent's way out when its task has egress (docs/decisions/0013).
 *
 *   vigil-relay [-p PORT] SOCKET -- COMMAND [ARG...]
 *
 * The container has no network device: only its own loopback. Most tools speak HTTP
 * proxy over TCP only, so this listens on 127.0.0.1:PORT (3128) inside the container and
 * relays every connection, byte for byte, to SOCKET: the executor's proxy for this task,
 * a unix socket in the read-only control mount. The proxy decides; this only carries.
 *
 * It then becomes COMMAND (execvp): the agent keeps the pid the container's init started,
 * gets its signals from the init directly and its exit status is the container's, exactly
 * as without egress. The relay itself runs in a grandchild that the init adopts (so the
 * agent never sees an unknown child of its own); it exits when the agent does (a pidfd of
 * the agent's process; in a container the pid namespace ends with it anyway). The listening socket exists before the agent starts:
 * its first connection cannot race the relay.
 *
 * Static, no allocation beyond one buffer pair per connection, one poll loop, bounded:
 * at most MAX_CONNS connections at once (more wait in the listen backlog). A relay that
 * cannot run fails closed: the agent's connections to 127.0.0.1:PORT are refused.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/pidfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define VERSION "1"
#define DEFAULT_PORT 3128
#define MAX_CONNS 256
#define BUF_SIZE 32768

/* One relayed connection: the agent's TCP side and the proxy's unix side. */
struct half {
    int fd;
    char buf[BUF_SIZE]; /* read from this side, not yet written to the other */
    size_t len, off;
    int eof; /* this side sent EOF (or failed): nothing more to read from it */
    int shut; /* the other side's write end was shut down after the buffer drained */
};

struct conn {
    struct half a; /* the agent's TCP connection */
    struct half b; /* the proxy's unix socket */
};

static struct conn *conns[MAX_CONNS];
static const char *sock_path;
static time_t last_complaint;

static void complain(const char *fmt, ...) {
    /* Diagnostics go to the agent's stderr (its log), at most one line a second. */
    time_t now = time(NULL);
    if (now == last_complaint) return;
    last_complaint = now;
    va_list ap;
    va_start(ap, fmt);
    fputs("vigil-relay: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static int dial_proxy(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, sock_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    /* A unix connect completes at once or fails (EAGAIN: the proxy's backlog is full). */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

static void drop(int i) {
    close(conns[i]->a.fd);
    close(conns[i]->b.fd);
    free(conns[i]);
    conns[i] = NULL;
}

static void accept_all(int lfd) {
    for (;;) {
        int slot = -1;
        for (int i = 0; i < MAX_CONNS; i++)
            if (!conns[i]) { slot = i; break; }
        if (slot < 0) return; /* full: the rest wait in the backlog */
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                complain("accept: %s", strerror(errno));
            return;
        }
        int up = dial_proxy();
        if (up < 0) {
            complain("cannot reach the egress proxy at %s: %s", sock_path, strerror(errno));
            close(fd); /* the agent sees its connection closed: fail closed */
            continue;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            complain("out of memory");
            close(fd);
            close(up);
            return;
        }
        c->a.fd = fd;
        c->b.fd = up;
        conns[slot] = c;
    }
}

/* Move bytes from `from` (its buffer) to `to`; 0 when the connection is finished or
 * broken, 1 while it lives. */
static int pump(struct half *from, struct half *to, short rev_from, short rev_to) {
    if (!from->eof && from->len == 0 && (rev_from & (POLLIN | POLLHUP | POLLERR))) {
        ssize_t n = read(from->fd, from->buf, BUF_SIZE);
        if (n > 0) {
            from->len = (size_t)n;
            from->off = 0;
        } else if (n == 0) {
            from->eof = 1;
        } else if (errno != EAGAIN && errno != EINTR) {
            return 0;
        }
    }
    (void)rev_to; /* writes are tried whenever there is data: a full socket says EAGAIN */
    if (from->len > from->off) {
        ssize_t n = send(to->fd, from->buf + from->off, from->len - from->off, MSG_NOSIGNAL);
        if (n > 0) {
            from->off += (size_t)n;
            if (from->off == from->len) from->len = from->off = 0;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return 0;
        }
    }
    if (from->eof && from->len == 0 && !from->shut) {
        shutdown(to->fd, SHUT_WR); /* pass the half-close on (TLS close_notify, HTTP/1.0) */
        from->shut = 1;
    }
    return 1;
}

static void relay_loop(int lfd, int agent) {
    struct pollfd fds[2 + 2 * MAX_CONNS];
    int idx[MAX_CONNS];
    for (;;) {
        int n = 0, live = 0;
        fds[n++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = agent, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = conns[i];
            idx[i] = -1;
            if (!c) continue;
            live++;
            idx[i] = n;
            /* Read a side only while its buffer is empty; write while there is data. */
            short ea = (short)((!c->a.eof && c->a.len == 0 ? POLLIN : 0) | (c->b.len ? POLLOUT : 0));
            short eb = (short)((!c->b.eof && c->b.len == 0 ? POLLIN : 0) | (c->a.len ? POLLOUT : 0));
            /* A side with nothing to wait for is left out: a hung-up socket would
             * otherwise report POLLHUP on every round and spin the loop. */
            fds[n++] = (struct pollfd){.fd = ea ? c->a.fd : -1, .events = ea};
            fds[n++] = (struct pollfd){.fd = eb ? c->b.fd : -1, .events = eb};
        }
        if (live == MAX_CONNS) fds[0].fd = -1; /* stop accepting until a slot frees */
        if (poll(fds, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            complain("poll: %s", strerror(errno));
            _exit(1);
        }
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = conns[i];
            if (!c || idx[i] < 0) continue;
            short ra = fds[idx[i]].revents, rb = fds[idx[i] + 1].revents;
            if (!pump(&c->a, &c->b, ra, rb) || !pump(&c->b, &c->a, rb, ra) ||
                (c->a.shut && c->b.shut)) {
                drop(i);
            }
        }
        if (fds[1].revents & POLLIN) _exit(0); /* the agent is gone: so is its way out */
        if (fds[0].revents & POLLIN) accept_all(lfd);
    }
}

static void usage(void) {
    fputs("usage: vigil-relay [-p PORT] SOCKET -- COMMAND [ARG...]\n"
          "  relays TCP connections to 127.0.0.1:PORT (default 3128) to the unix socket\n"
          "  SOCKET, then runs COMMAND in its place.\n", stderr);
    exit(2);
}

int main(int argc, char **argv) {
    int port = DEFAULT_PORT;
    int i = 1;
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        puts("vigil-relay " VERSION);
        return 0;
    }
    if (i + 1 < argc && strcmp(argv[i], "-p") == 0) {
        char *end;
        long p = strtol(argv[i + 1], &end, 10);
        if (*end || p < 1 || p > 65535) usage();
        port = (int)p;
        i += 2;
    }
    if (i + 2 >= argc || strcmp(argv[i + 1], "--") != 0) usage();
    sock_path = argv[i];
    char **command = &argv[i + 2];

    int agent = (int)pidfd_open(getpid(), 0); /* this process, the agent once exec'd */
    if (agent < 0) {
        fprintf(stderr, "vigil-relay: pidfd_open: %s\n", strerror(errno));
        return 125;
    }
    int lfd = listen_on(port);
    if (lfd < 0) {
        /* Without it the agent would run with no way out and not know why. */
        fprintf(stderr, "vigil-relay: cannot listen on 127.0.0.1:%d: %s\n", port,
                strerror(errno));
        return 125;
    }
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "vigil-relay: cannot fork: %s\n", strerror(errno));
        return 125;
    }
    if (child == 0) {
        /* Fork again and exit, so that the init adopts (and reaps) the relay. */
        pid_t relay = fork();
        if (relay != 0) _exit(relay < 0 ? 1 : 0);
        signal(SIGPIPE, SIG_IGN);
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1); /* the agent's stdout is its log and its control channel */
        }
        relay_loop(lfd, agent);
        _exit(0);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "vigil-relay: cannot fork the relay\n");
        return 125;
    }
    close(lfd);
    close(agent);
    execvp(command[0], command);
    int err = errno;
    fprintf(stderr, "vigil-relay: cannot run %s: %s\n", command[0], strerror(err));
    return err == ENOENT ? 127 : 126;
}
