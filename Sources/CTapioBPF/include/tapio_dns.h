/* The `dns` signal: DNS over UDP seen by cgroup_skb programs (bpf/dns.bpf.c)
 * attached to one cgroup2 directory, each answer matched to its query.
 *
 * Egress records every query (UDP to the DNS port, QR=0, standard query,
 * at least one question) in a pending table keyed by the sending socket and
 * the DNS id. Ingress matches each response (UDP from the DNS port, QR=1)
 * on the same key and emits one struct tapio_event
 * of kind TAPIO_KIND_DNS (u.dns: name, qtype, rcode, latency, server, up to
 * four A/AAAA answers). Queries still pending after the timeout are emitted by
 * tapio_dns_scan_due() with rcode -1. Whoever deletes a pending entry, the kernel
 * (answer) or user space (timeout), emits it: a query gives one event.
 *
 * The header of each event describes the querying process: pid, tid, ppid and
 * comm where the query was sent in that process's context (0 / "" otherwise,
 * or where the kernel lacks bpf_get_current_task for cgroup_skb programs),
 * uid the socket owner, cgroup_id the socket's cgroup v2 id. ts_ns is when the
 * outcome became known: the answer's arrival, or the timeout scan.
 *
 * Threads: tapio_dns_scan_due() on one thread at a time; the getters,
 * tapio_dns_read_drops() and tapio_dns_read_stats() from any thread;
 * tapio_dns_close() after all others have returned.
 *
 * The first part of this header is also compiled by clang -target bpf: it is
 * the layout of the pending table shared by the kernel program and the
 * loader, not part of the API.
 */
#ifndef TAPIO_DNS_H
#define TAPIO_DNS_H

#include "tapio_events.h"

/* Longest name in DNS wire format (RFC 1035 2.3.4), terminating 0 included. */
#define TAPIO_DNS_WIRE_NAME_MAX 255
/* Default size of the pending table (queries in flight at once). */
#define TAPIO_DNS_DEFAULT_MAX_PENDING 16384u

/* A query waiting for its answer: the key of the pending table. The server
 * address is not part of it: a query to a Service IP that local DNAT rewrites
 * (hostNetwork processes behind kube-proxy) leaves with the backend's address
 * but its answer arrives, de-NATed, from the Service IP. */
struct tapio_dns_pending_key {
	__u64 socket_cookie; /* bpf_get_socket_cookie(): unique per socket, across netns */
	__u16 id;            /* DNS message id */
	__u16 family;        /* AF_INET 2, AF_INET6 10 */
	__u32 _pad;
};

/* The value: what the answer (or timeout) event needs from the query. */
struct tapio_dns_pending {
	__u64 ts_ns;      /* bpf_ktime_get_ns() when the query left */
	__u64 cgroup_id;  /* bpf_skb_cgroup_id(): the socket's cgroup v2 id */
	__u32 pid;        /* 0 when the query was not sent in process context */
	__u32 tid;
	__u32 ppid;
	__u32 uid;        /* owner of the socket */
	__u32 netns;      /* network namespace inode of the sender; 0 when unknown */
	__u16 qtype;
	__u16 qname_wire_len; /* bytes of the question's name in wire format */
	__u16 server_port;    /* host order */
	__u16 _pad[3];
	/* Where the query was sent, as it left (after any local DNAT); network
	 * order in the first 4 (AF_INET) or 16 (AF_INET6) bytes. */
	__u8 server[16];
	__u8 comm[TAPIO_COMM_LEN];
	__u8 name[TAPIO_DNS_NAME_LEN];
};

/* Counters of the dns programs (per-CPU in the kernel, summed by
 * tapio_dns_read_stats()). Lost events are also in the drop counters. */
enum tapio_dns_stat {
	TAPIO_DNS_STAT_QUERIES = 0,          /* queries entered in the pending table */
	TAPIO_DNS_STAT_ANSWERS = 1,          /* responses matched to a pending query and emitted */
	TAPIO_DNS_STAT_UNMATCHED = 2,        /* responses with no pending query (late, or the query was not seen) */
	TAPIO_DNS_STAT_RETRANSMITS = 3,      /* query already pending (same socket and id): the first send counts */
	TAPIO_DNS_STAT_PENDING_FULL = 4,     /* query not tracked: pending table full (also a drop, see tapio_dns_read_drops) */
	TAPIO_DNS_STAT_MALFORMED = 5,        /* DNS-port datagrams not parsed: short, bad name, compression in a question */
	TAPIO_DNS_STAT_TIMEOUTS = 6,         /* counted in user space: timeout events emitted */
	TAPIO_DNS_STAT_MAX = 7,
};

#ifndef __TAPIO_BPF__

#include <stddef.h>
#include <stdint.h>

#include "tapio_bpf.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The struct tag differs from the libbpf skeleton's struct tapio_dns. */
typedef struct tapio_dns_loader tapio_dns;

#define TAPIO_DNS_DEFAULT_TIMEOUT_NS 5000000000ull
#define TAPIO_DNS_DEFAULT_PORT 53u

typedef struct {
	/* cgroup2 directory to attach to: the agent's --cgroup-root, or NULL
	 * for the root of the cgroup2 mount (the whole node). The programs see
	 * the sockets of every cgroup below it, by the cgroup a socket was
	 * created in. */
	const char *cgroup_path;
	uint64_t timeout_ns;    /* 0 = 5 s: a query unanswered this long is emitted with rcode -1 */
	uint32_t ringbuf_bytes; /* 0 = 4 MiB; power of two, multiple of the page size */
	uint32_t max_pending;   /* 0 = 16384 queries in flight at once; more are counted and dropped */
	uint16_t port;          /* 0 = 53: the server port that marks DNS traffic */
	uint32_t wakeup_bytes;  /* fill mark, as in tapio_bpf_config */
} tapio_dns_config;

/* Opens, configures, loads and attaches the egress and ingress programs to
 * the cgroup with BPF links (multi-attach: programs attached by others stay).
 * Both must attach, since queries without their answers would all time out:
 * otherwise NULL, and a message in err (with the end of the verifier log when
 * loading failed; 4096 bytes holds the useful part). */
tapio_dns *tapio_dns_open(const tapio_dns_config *config, char *err, size_t err_len);

/* "dns": the capability these programs provide, also when open failed. */
const char *tapio_dns_capability(void);
/* 1 when both programs are attached (always, for an object that opened). */
int tapio_dns_attached(const tapio_dns *dns);
/* Why the capability is degraded, or "". Open failures are reported in
 * tapio_dns_open()'s err; this is "" for an object that opened. */
const char *tapio_dns_error(const tapio_dns *dns);
/* The cgroup2 directory the programs are attached to (resolved path). */
const char *tapio_dns_cgroup_path(const tapio_dns *dns);
/* 1 when the kernel lets cgroup_skb programs read the current task, so
 * queries carry pid, tid, ppid, comm and netns; 0 when they carry only
 * cgroup_id and uid. */
int tapio_dns_has_process_context(const tapio_dns *dns);

/* Answers arrive through the ring buffer (tapio_dns_events_fd(), read by a
 * tapio_rings). Queries left unanswered past the timeout are found by a scan
 * of the pending table, due every timeout / 5 (between 10 ms and 1 s): when
 * it is due, delivers them to fn with rcode -1. Returns events delivered, or
 * -errno. fn returning non-zero ends the scan after that event. */
int tapio_dns_scan_due(tapio_dns *dns, tapio_bpf_event_fn fn, void *ctx);
/* The ring buffer map, for a tapio_rings reader, and its size. */
int tapio_dns_events_fd(const tapio_dns *dns);
uint32_t tapio_dns_ringbuf_bytes(const tapio_dns *dns);

/* Sums the per-CPU drop counters like tapio_bpf_read_drops(): out[kind *
 * TAPIO_DROP_REASON_MAX + reason]; only kind TAPIO_KIND_DNS is ever non-zero.
 * RINGBUF_FULL: an answer (the query is forgotten). MAP_FULL: a query not
 * tracked because the pending table was full. 0 or -errno. */
int tapio_dns_read_drops(tapio_dns *dns, uint64_t *out, size_t slots);

/* out[TAPIO_DNS_STAT_*]: fills min(slots, TAPIO_DNS_STAT_MAX), zeroes the
 * rest. Counters only grow. 0 or -errno. */
int tapio_dns_read_stats(tapio_dns *dns, uint64_t *out, size_t slots);

/* Number of queries waiting for an answer now (walks the table). */
int tapio_dns_pending_count(tapio_dns *dns);

/* Destroys the links (detaching the programs) and unloads. NULL is ignored. */
void tapio_dns_close(tapio_dns *dns);

#ifdef __cplusplus
}
#endif

#endif /* !__TAPIO_BPF__ */

#endif
