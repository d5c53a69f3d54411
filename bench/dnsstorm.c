/* A DNS query flood and the server that answers it, over UDP on loopback.
 *
 * The agent's DNS program (bpf/dns.bpf.c, cgroup_skb) keeps each query seen
 * on egress to port 53 and emits one record when the answer comes back on
 * ingress, so every answered query is one record through the DNS ring. The
 * responder answers each query with one A record; the flood sends standard
 * queries (one question, type A, a new name each time) at a fixed rate,
 * paced per millisecond, with at most WINDOW queries unanswered.
 *
 * Usage:
 *   dnsstorm -R [-a ADDR] [-p PORT]
 *       answer until SIGINT or SIGTERM; prints "answered=N" at the end.
 *       Prints "ready" once bound.
 *   dnsstorm [-a ADDR] [-p PORT] [-q QPS] [-d SECONDS] [-w WINDOW]
 *       flood; QPS 0 sends as fast as answers come back. Prints
 *       "sent=N answered=M lost=L seconds=S" on stdout.
 * ADDR defaults to 127.53.0.1 (a loopback address of its own, apart from
 * any resolver of the machine), PORT to 53, the port the agent watches.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define PACKET 512

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The length of the question name starting at p (labels and the root), or
 * -1 when it does not fit in len bytes. */
static int name_length(const uint8_t *p, int len)
{
	int i = 0;

	while (i < len && p[i] != 0) {
		if (p[i] & 0xc0)
			return -1;
		i += p[i] + 1;
	}
	return i < len ? i + 1 : -1;
}

static int respond(struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int size = 4 << 20;

	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	if (fd < 0 || bind(fd, (struct sockaddr *)addr, sizeof(*addr)) != 0) {
		perror("dnsstorm -R: bind");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);

	static uint8_t bufs[BATCH][PACKET];
	struct sockaddr_in peers[BATCH];
	struct iovec iov[BATCH];
	struct mmsghdr msgs[BATCH];
	uint64_t answered = 0;

	while (!stopping) {
		for (int i = 0; i < BATCH; i++) {
			iov[i] = (struct iovec){bufs[i], PACKET};
			msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i], .msg_namelen = sizeof(peers[i]),
							  .msg_iov = &iov[i], .msg_iovlen = 1};
		}
		struct pollfd pfd = {fd, POLLIN, 0};
		if (poll(&pfd, 1, 200) <= 0)
			continue;
		int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
		if (n <= 0)
			continue;
		int out = 0;
		for (int i = 0; i < n; i++) {
			uint8_t *p = bufs[i];
			int len = msgs[i].msg_len;
			int qname;

			if (len < 12 || (p[2] & 0x80) || p[4] != 0 || p[5] != 1)
				continue;
			qname = name_length(p + 12, len - 12);
			if (qname < 0 || 12 + qname + 4 > len)
				continue;
			len = 12 + qname + 4; /* the question, without anything after it */
			if (len + 16 > PACKET)
				continue;
			p[2] = 0x81; /* QR, RD */
			p[3] = 0x80; /* RA, NOERROR */
			p[6] = 0; p[7] = 1;   /* one answer */
			p[8] = p[9] = p[10] = p[11] = 0;
			static const uint8_t answer[16] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 53, 0, 1};
			memcpy(p + len, answer, sizeof(answer));
			iov[i].iov_len = len + sizeof(answer);
			if (out != i) {
				msgs[out] = msgs[i];
			}
			out++;
		}
		for (int sent = 0; sent < out;) {
			int m = sendmmsg(fd, msgs + sent, out - sent, 0);
			if (m <= 0)
				break;
			sent += m;
			answered += m;
		}
	}
	printf("answered=%llu\n", (unsigned long long)answered);
	return 0;
}

static int build_query(uint8_t *p, uint16_t id, uint64_t seq)
{
	char label[16];
	int n = snprintf(label, sizeof(label), "q%llu", (unsigned long long)(seq % 1000000));
	static const uint8_t suffix[] = "\5bench\5tapio\4test";
	int len = 0;

	p[len++] = id >> 8;
	p[len++] = id & 0xff;
	p[len++] = 0x01; /* RD */
	p[len++] = 0x00;
	p[len++] = 0; p[len++] = 1; /* one question */
	memset(p + len, 0, 6);
	len += 6;
	p[len++] = n;
	memcpy(p + len, label, n);
	len += n;
	memcpy(p + len, suffix, sizeof(suffix)); /* with the root's 0 */
	len += sizeof(suffix);
	p[len++] = 0; p[len++] = 1; /* A */
	p[len++] = 0; p[len++] = 1; /* IN */
	return len;
}

static int flood(struct sockaddr_in *addr, double qps, double duration, int window)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	int size = 4 << 20;

	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	if (fd < 0 || connect(fd, (struct sockaddr *)addr, sizeof(*addr)) != 0) {
		perror("dnsstorm: connect");
		return 1;
	}
	static uint8_t out[BATCH][PACKET], in[BATCH][PACKET];
	struct iovec oiov[BATCH], iiov[BATCH];
	struct mmsghdr omsg[BATCH], imsg[BATCH];
	uint64_t sent = 0, answered = 0, lost = 0;
	double start = now(), last_answer = start, t;

	memset(omsg, 0, sizeof(omsg));
	memset(imsg, 0, sizeof(imsg));
	for (int i = 0; i < BATCH; i++) {
		iiov[i] = (struct iovec){in[i], PACKET};
		imsg[i].msg_hdr.msg_iov = &iiov[i];
		imsg[i].msg_hdr.msg_iovlen = 1;
		omsg[i].msg_hdr.msg_iov = &oiov[i];
		omsg[i].msg_hdr.msg_iovlen = 1;
	}
	while (!stopping && (t = now()) - start < duration) {
		uint64_t outstanding = sent - answered - lost;
		double due = qps > 0 ? qps * (t - start) - (double)sent : BATCH;
		int n = due < 1 ? 0 : due > BATCH ? BATCH : (int)due;

		if ((uint64_t)n > window - outstanding)
			n = window - outstanding;
		/* An answer that never comes would hold its window slot forever. */
		if (outstanding > 0 && t - last_answer > 0.2) {
			lost += outstanding;
			last_answer = t;
		}
		for (int i = 0; i < n; i++) {
			oiov[i] = (struct iovec){out[i], build_query(out[i], (uint16_t)(sent + i), sent + i)};
		}
		if (n > 0) {
			int m = sendmmsg(fd, omsg, n, 0);
			if (m > 0)
				sent += m;
		}
		int r = recvmmsg(fd, imsg, BATCH, MSG_DONTWAIT, NULL);
		if (r > 0) {
			answered += r;
			last_answer = now();
		} else if (n == 0) {
			/* Nothing due or the window is full: wait for an answer or
			 * the next millisecond's queries. */
			struct pollfd pfd = {fd, POLLIN, 0};
			poll(&pfd, 1, 1);
		}
	}
	double end = now();
	/* Answers still on their way. */
	for (double until = end + 0.2; now() < until && sent > answered + lost;) {
		struct pollfd pfd = {fd, POLLIN, 0};
		if (poll(&pfd, 1, 50) > 0) {
			int r = recvmmsg(fd, imsg, BATCH, MSG_DONTWAIT, NULL);
			if (r > 0)
				answered += r;
		}
	}
	if (sent > answered)
		lost = sent - answered;
	printf("sent=%llu answered=%llu lost=%llu seconds=%.3f\n", (unsigned long long)sent,
	       (unsigned long long)answered, (unsigned long long)lost, end - start);
	return 0;
}

int main(int argc, char **argv)
{
	const char *host = "127.53.0.1";
	int port = 53, window = 256, responder = 0, opt;
	double qps = 90000, duration = 5;
	struct sockaddr_in addr = {.sin_family = AF_INET};

	while ((opt = getopt(argc, argv, "Ra:p:q:d:w:")) != -1) {
		switch (opt) {
		case 'R': responder = 1; break;
		case 'a': host = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'q': qps = atof(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 'w': window = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s -R [-a ADDR] [-p PORT] | [-a ADDR] [-p PORT] [-q QPS] [-d SECONDS] [-w WINDOW]\n",
				argv[0]);
			return 2;
		}
	}
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1 || port <= 0 || port > 65535 || window < 1 || window > 4096) {
		fprintf(stderr, "dnsstorm: bad arguments (an IPv4 address, a port, 1..4096 for the window)\n");
		return 2;
	}
	addr.sin_port = htons(port);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	return responder ? respond(&addr) : flood(&addr, qps, duration, window);
}
