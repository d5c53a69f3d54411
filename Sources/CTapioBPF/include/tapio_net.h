/* Network signals: TCP connects, listeners, resets, retransmits, request
 * latency and packet drops, from bpf/net.bpf.c (tracepoints only).
 *
 * Two halves, both in this header:
 *  - the ABI of the kernel's aggregation maps (struct tapio_net_*_key and
 *    *_value), compiled by clang -target bpf and by the host compiler;
 *  - the loader API (tapio_net_open() ... tapio_net_close()), host only.
 *
 * What reaches user space, and how:
 *  - tcp_listen: one ring-buffer record per listener opened or closed
 *    (struct tapio_event, kind TCP_LISTEN), read by a tapio_rings.
 *  - tcp_connect and tcp_reset: folded in kernel hash maps per key and
 *    interval, harvested by tapio_net_harvest_due() once per interval and delivered
 *    as struct tapio_event (u.tcp.count = attempts folded, >= 1) through the
 *    same callback as ring-buffer records.
 *  - tcp_retransmit, tcp_latency, packet_drop: folded the same way and
 *    delivered as struct tapio_aggregate (tapio_events.h has no record
 *    for them) through a second callback.
 *
 * Threads: tapio_net_harvest(), tapio_net_harvest_due() and the netns calls on one
 * thread at a time; the program getters and tapio_net_read_drops() from any
 * thread; tapio_net_close() after all others have returned.
 */
#ifndef TAPIO_NET_H
#define TAPIO_NET_H

#include "tapio_events.h"

/* ---- Kernel ABI: keys and values of the aggregation maps. ---- */

/* Where a flow-keyed map stores which side it is about (`tag`). */
enum tapio_net_role {
	TAPIO_NET_ROLE_CLIENT = 1, /* tcp_latency: active opener; time = first recv after a send */
	TAPIO_NET_ROLE_SERVER = 2, /* tcp_latency: passive opener; time = first send after a recv */
};

/* tcp_connect, per (cgroup, netns, destination, outcome) per interval. The
 * source port is not part of the key: it is ephemeral. */
struct tapio_net_connect_key {
	__u64 cgroup_id;  /* of the task that called connect() */
	__u32 netns;
	__u16 family;     /* AF_INET 2, AF_INET6 10 */
	__u16 dport;      /* host order */
	__u8 daddr[16];   /* network order, first 4 bytes for AF_INET */
	__u8 outcome;     /* enum tapio_connect_outcome */
	__u8 _pad[7];
};

/* The first attempt of the interval describes the aggregate (pid, comm,
 * latency, error); count and the latency sum/max cover all of them. */
struct tapio_net_connect_value {
	__u64 count;
	__u64 first_ts_ns;      /* CLOCK_MONOTONIC, when the first attempt ended */
	__u64 first_latency_ns; /* connect() to ESTABLISHED/CLOSE of the first attempt */
	__u64 latency_ns_total;
	__u64 latency_ns_max;   /* best effort under concurrent updates */
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__s32 error;            /* sk_err of the first attempt, 0 when established */
	__u16 sport;            /* of the first attempt */
	__u16 _pad;
	__u32 _pad2;
	__u8 comm[TAPIO_COMM_LEN];
};

/* A TCP flow, for tcp_reset, tcp_retransmit and tcp_latency. s* is the local
 * side, d* the peer. A port that is known to be ephemeral is 0 (see
 * docs/events.md): tcp_latency keys the client's local port and the server's
 * peer port as 0, tcp_reset zeroes the peer port of a RST answering a
 * segment no connection owns, and the local port of a RST received while
 * connecting. */
struct tapio_net_flow_key {
	__u64 cgroup_id;  /* cgroup of the socket, 0 when there is none */
	__u32 netns;
	__u16 family;
	__u16 sport;      /* host order */
	__u16 dport;      /* host order */
	__u8 tag;         /* tcp_reset: direction 1 sent, 0 received; tcp_latency: enum tapio_net_role; tcp_retransmit: 0 */
	__u8 _pad[5];
	__u8 saddr[16];   /* network order */
	__u8 daddr[16];
};

/* tcp_reset and tcp_retransmit per flow per interval; packet_drop per drop
 * key per interval. */
struct tapio_net_count_value {
	__u64 count;
	__u64 first_ts_ns;
	__u32 state;      /* TCP state of the socket at the last event (TCP_ESTABLISHED 1 ...), 0 unknown */
	__u32 _pad;
};

/* tcp_latency per flow per interval. */
struct tapio_net_latency_value {
	__u64 responses;
	__u64 response_ns_total;
	__u64 response_ns_max;   /* best effort under concurrent updates */
	__u64 srtt_us_total;     /* smoothed RTT sampled at each response */
	__u64 srtt_samples;
	__u64 first_ts_ns;
};

/* packet_drop, per (reason, netns, cgroup, protocol, addresses, ports). */
struct tapio_net_drop_key {
	__u32 reason;     /* enum skb_drop_reason of the running kernel */
	__u32 netns;
	__u64 cgroup_id;  /* socket's cgroup when the skb had a full socket, else 0 */
	__u16 family;     /* 0 when the packet was neither IPv4 nor IPv6 */
	__u8 protocol;    /* IPPROTO_TCP 6, IPPROTO_UDP 17, ... */
	__u8 _pad;
	__u16 sport;      /* 0 for the sender of a TCP SYN (ephemeral), non-TCP/UDP, fragments */
	__u16 dport;
	__u8 saddr[16];   /* as in the packet: saddr is its sender */
	__u8 daddr[16];
};

_Static_assert(sizeof(struct tapio_net_connect_key) == 40, "tapio_net_connect_key layout");
_Static_assert(sizeof(struct tapio_net_connect_value) == 80, "tapio_net_connect_value layout");
_Static_assert(sizeof(struct tapio_net_flow_key) == 56, "tapio_net_flow_key layout");
_Static_assert(sizeof(struct tapio_net_count_value) == 24, "tapio_net_count_value layout");
_Static_assert(sizeof(struct tapio_net_latency_value) == 48, "tapio_net_latency_value layout");
_Static_assert(sizeof(struct tapio_net_drop_key) == 56, "tapio_net_drop_key layout");

/* Per-CPU token bucket of one kind (map `rate`). */
struct tapio_net_bucket {
	__u64 tokens;
	__u64 last_ns;
};

#ifndef __TAPIO_BPF__

/* ---- Loader API (user space). ---- */

#include <stddef.h>
#include <stdint.h>

#include "tapio_aggregate.h"
#include "tapio_bpf.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The skeleton of bpf/net.bpf.c is `struct tapio_net`; the handle has
 * another tag so both can live in net.c. */
typedef struct tapio_net_handle tapio_net;

typedef struct {
	uint64_t cgroup_root_id;      /* 0 = every cgroup */
	uint32_t cgroup_root_level;   /* depth of that cgroup below the cgroup2 root (root = 0) */
	uint32_t kinds_disabled_mask; /* bit (1u << kind) turns a kind off */
	/* Only events whose network namespace was passed to
	 * tapio_net_allow_netns() pass (empty set: none). */
	uint32_t netns_filter;
	/* Token bucket per CPU per kind for ring-buffer records and for new
	 * aggregation entries (an existing entry always counts); 0 = no limit.
	 * Burst = one second's worth. */
	uint32_t events_per_sec;
	uint32_t ringbuf_bytes;       /* 0 = default (256 KiB); power of two, multiple of page size */
	uint32_t wakeup_bytes;        /* fill mark, as in tapio_bpf_config */
	uint64_t interval_ns;         /* aggregation interval; 0 = default (1 s) */
} tapio_net_config;

/* tcp_retransmit, tcp_latency and packet_drop arrive as struct
 * tapio_aggregate (tapio_aggregate.h). Addresses in network order in the
 * first 4 (AF_INET) or 16 bytes of saddr/daddr, ports in host order. */

/* Opens, configures, loads and attaches. A program that fails to load
 * (verifier, missing CO-RE target) or attach degrades only itself: it is
 * listed with its error and the rest run. A kind disabled in the config is
 * not loaded. NULL when nothing could be loaded or attached, with a message
 * in err. Mounts tracefs if needed. */
tapio_net *tapio_net_open(const tapio_net_config *config, char *err, size_t err_len);

int tapio_net_program_count(const tapio_net *net);
/* BPF program name, e.g. "handle_connect_state"; NULL for a bad index. */
const char *tapio_net_program_name(const tapio_net *net, int index);
/* "tcp_connect", "tcp_listen", "tcp_reset", "tcp_retransmit",
 * "tcp_latency" or "packet_drop"; NULL for a bad index. Several programs
 * may provide one capability; it works when all of them are attached. */
const char *tapio_net_program_capability(const tapio_net *net, int index);
int tapio_net_program_attached(const tapio_net *net, int index);
/* Why the program is degraded, "" when attached; NULL for a bad index. */
const char *tapio_net_program_error(const tapio_net *net, int index);

/* The netns filter's set (network namespace inode numbers, e.g. from
 * stat("/proc/<pid>/ns/net").st_ino). 0 or -errno. */
int tapio_net_allow_netns(tapio_net *net, uint32_t inum);
int tapio_net_forget_netns(tapio_net *net, uint32_t inum);

/* Empties every aggregation map now: tcp_connect and tcp_reset aggregates
 * go to event_fn as struct tapio_event, the others to aggregate_fn (NULL:
 * they are discarded). Starts a new interval. Returns aggregates delivered,
 * or -errno. Callbacks' return values are ignored here: an entry leaves the
 * kernel map when it is read, so a harvest delivers all it took.
 *
 * Exact: the maps are double buffered. The harvest switches the programs to
 * the other generation, waits (at most 1 s, normally microseconds) until no
 * program is still adding to the one it retired, and empties that one, so
 * every event is in exactly one harvest. Should the wait time out (a program
 * preempted mid-event), the retired generation is emptied by the next
 * harvest instead (-EBUSY if it is still busy then); nothing is lost. */
int tapio_net_harvest(tapio_net *net, tapio_bpf_event_fn event_fn,
		      tapio_aggregate_fn aggregate_fn, void *ctx);

/* tapio_net_harvest() when an interval has passed since the last one (the
 * ring is read by a tapio_rings). Aggregates delivered, or -errno. */
int tapio_net_harvest_due(tapio_net *net, tapio_bpf_event_fn event_fn, tapio_aggregate_fn aggregate_fn, void *ctx);
/* The ring buffer map, for a tapio_rings reader, and its size. */
int tapio_net_events_fd(const tapio_net *net);
uint32_t tapio_net_ringbuf_bytes(const tapio_net *net);

/* Same layout as tapio_bpf_read_drops(): out[kind * TAPIO_DROP_REASON_MAX +
 * reason], summed over CPUs: RINGBUF_FULL (tcp_listen records),
 * RATE_LIMITED (records and new aggregation keys over events_per_sec),
 * MAP_FULL (a new key found its aggregation map full). 0 or -errno. */
int tapio_net_read_drops(tapio_net *net, uint64_t *out, size_t slots);

/* Detaches and unloads everything. NULL is ignored. */
void tapio_net_close(tapio_net *net);

#ifdef __cplusplus
}
#endif

#endif /* !__TAPIO_BPF__ */

#endif
