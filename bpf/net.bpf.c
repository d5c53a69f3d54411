// SPDX-License-Identifier: GPL-2.0
/* Network signals: TCP connect outcomes, listeners, resets, retransmits,
 * request/response latency, packet drops with the kernel's reason.
 *
 * Classic tracepoints only. Socket and skb fields are read with CO-RE; the
 * tracepoint records themselves are read only where their layout has been
 * stable for years (a pointer right after the common header), so a reshaped
 * tracepoint (tcp_send_reset changed in 6.10) costs nothing.
 *
 * Everything frequent is folded in hash maps per key and interval (the
 * loader empties them every interval, double buffered: see "Generations");
 * only listener changes use the ring buffer. Events of softirq context (a RST, a retransmit, a drop) have no
 * meaningful current task: they are attributed to the socket's cgroup, and
 * tcp_connect to the task that called connect(), remembered per socket.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

#include "common.bpf.h"
#include "generations.bpf.h"
#include "tapio_net.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define MSG_PEEK 2
#define ECONNREFUSED 111
#define ECONNRESET 104
#define ETIMEDOUT 110

/* include/net/tcp_states.h */
#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_SYN_RECV_ 3
#define TCP_TIME_WAIT_ 6
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10
#define TCP_NEW_SYN_RECV_ 12

#define TAPIO_NET_AGG_ENTRIES 8192

/* Only events whose netns is in netns_allowed pass (set by the loader). */
const volatile bool netns_filter = false;
/* Token bucket rate per CPU per kind; 0 = unlimited. */
const volatile __u32 events_per_sec = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} netns_allowed SEC(".maps");

/* enum skb_drop_reason values not worth reporting; the loader fills it from
 * kernel BTF by name. Values beyond the array are reported. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} drop_reason_ignored SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAPIO_KIND_MAX);
	__type(key, __u32);
	__type(value, struct tapio_net_bucket);
} rate SEC(".maps");

/* A connect() in progress: who called it and when. */
struct connect_start {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 _pad;
	__u8 comm[TAPIO_COMM_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* struct sock * */
	__type(value, struct connect_start);
} connecting SEC(".maps");

/* Request/response tracking of an established socket in scope. */
struct conn_state {
	__u64 request_ts_ns; /* 0: not waiting for a response */
	__u8 role;           /* enum tapio_net_role */
	__u8 _pad;
	/* The connection's ports when it was registered (host order): a socket
	 * freed without a CLOSE transition seen here leaves its entry behind,
	 * and the next socket at that address (any pod's, any namespace's) would
	 * be measured with its role. */
	__u16 sport;
	__u16 dport;
	__u8 _pad2[2];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* struct sock * */
	__type(value, struct conn_state);
} conns SEC(".maps");

/* Every aggregation map exists twice, one per generation: the programs fold
 * into the active generation (agg_gen) while the loader empties the other,
 * which nothing writes any more. TAPIO_NET_AGG_ENTRIES is per generation. */
#define TAPIO_NET_AGG_MAP(name, key_type, value_type)           \
	struct {                                                 \
		__uint(type, BPF_MAP_TYPE_HASH);                 \
		__uint(max_entries, TAPIO_NET_AGG_ENTRIES);      \
		__type(key, key_type);                           \
		__type(value, value_type);                       \
	} name SEC(".maps")

TAPIO_NET_AGG_MAP(connect_agg0, struct tapio_net_connect_key, struct tapio_net_connect_value);
TAPIO_NET_AGG_MAP(connect_agg1, struct tapio_net_connect_key, struct tapio_net_connect_value);
TAPIO_NET_AGG_MAP(reset_agg0, struct tapio_net_flow_key, struct tapio_net_count_value);
TAPIO_NET_AGG_MAP(reset_agg1, struct tapio_net_flow_key, struct tapio_net_count_value);
TAPIO_NET_AGG_MAP(retransmit_agg0, struct tapio_net_flow_key, struct tapio_net_count_value);
TAPIO_NET_AGG_MAP(retransmit_agg1, struct tapio_net_flow_key, struct tapio_net_count_value);
TAPIO_NET_AGG_MAP(latency_agg0, struct tapio_net_flow_key, struct tapio_net_latency_value);
TAPIO_NET_AGG_MAP(latency_agg1, struct tapio_net_flow_key, struct tapio_net_latency_value);
TAPIO_NET_AGG_MAP(drop_agg0, struct tapio_net_drop_key, struct tapio_net_count_value);
TAPIO_NET_AGG_MAP(drop_agg1, struct tapio_net_drop_key, struct tapio_net_count_value);


/* Kernels before 5.15: sock_cgroup_data was a u64 that held the cgroup
 * pointer when its low bit was clear. */
struct sock_cgroup_data___old {
	__u64 val;
} __attribute__((preserve_access_index));

/* Kernels before 6.1 kept ancestor ids, not pointers. */
struct cgroup___old {
	__u64 ancestor_ids[0];
} __attribute__((preserve_access_index));

/* ---- Rate limit ---- */

/* One token per event; refills at events_per_sec, holds at most one
 * second's worth. Per CPU, so no lock; a program interleaving on the same
 * CPU may race the read-modify-write, which only blurs the rate. */
static __always_inline bool tapio_rate_ok(__u32 kind)
{
	struct tapio_net_bucket *b;
	__u64 now, elapsed, add;
	__u32 key = kind;

	if (events_per_sec == 0)
		return true;
	b = bpf_map_lookup_elem(&rate, &key);
	if (!b)
		return true;
	now = bpf_ktime_get_ns();
	elapsed = now - b->last_ns;
	if (elapsed >= 1000000000ULL) {
		b->tokens = events_per_sec;
		b->last_ns = now;
	} else {
		add = elapsed * events_per_sec / 1000000000ULL;
		if (add) {
			b->tokens += add;
			if (b->tokens > events_per_sec)
				b->tokens = events_per_sec;
			/* Keep the fraction of a token not yet earned. */
			b->last_ns += add * 1000000000ULL / events_per_sec;
		}
	}
	if (b->tokens == 0) {
		tapio_count_drop(kind, TAPIO_DROP_RATE_LIMITED);
		return false;
	}
	b->tokens--;
	return true;
}

/* ---- Sockets ---- */

static __always_inline __u32 tapio_sk_netns(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline bool tapio_netns_ok(__u32 netns)
{
	if (!netns_filter)
		return true;
	return bpf_map_lookup_elem(&netns_allowed, &netns) != NULL;
}

/* Request and time-wait sockets are only a sock_common: no cgroup. */
static __always_inline bool tapio_sk_full(struct sock *sk)
{
	__u8 state = BPF_CORE_READ(sk, __sk_common.skc_state);

	return state != TCP_TIME_WAIT_ && state != TCP_NEW_SYN_RECV_;
}

static __always_inline struct cgroup *tapio_sk_cgroup(struct sock *sk)
{
	struct sock_cgroup_data___old *old;
	__u64 val;

	if (bpf_core_field_exists(sk->sk_cgrp_data.cgroup))
		return BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	old = (void *)&sk->sk_cgrp_data;
	val = BPF_CORE_READ(old, val);
	return (val & 1) ? NULL : (struct cgroup *)val;
}

/* The cgroup v2 id of a socket's cgroup and whether it is in the watched
 * subtree. A socket without a cgroup (request/time-wait sockets, none) has
 * id 0 and passes: it cannot be placed, the netns filter still applies. */
static __always_inline bool tapio_sk_scope(struct sock *sk, __u64 *cgroup_id)
{
	struct cgroup *cg = NULL;
	struct cgroup *ancestor;
	__u64 id = 0;
	int level;

	*cgroup_id = 0;
	if (sk && tapio_sk_full(sk))
		cg = tapio_sk_cgroup(sk);
	if (!cg)
		return true;
	*cgroup_id = BPF_CORE_READ(cg, kn, id);
	if (cgroup_root_id == 0)
		return true;
	level = BPF_CORE_READ(cg, level);
	if (level < (int)cgroup_root_level)
		return false;
	if (bpf_core_field_exists(cg->ancestors)) {
		bpf_core_read(&ancestor, sizeof(ancestor), &cg->ancestors[cgroup_root_level & 0xff]);
		id = BPF_CORE_READ(ancestor, kn, id);
	} else {
		struct cgroup___old *o = (void *)cg;

		bpf_core_read(&id, sizeof(id), &o->ancestor_ids[cgroup_root_level & 0xff]);
	}
	return id == cgroup_root_id;
}

/* Local address/port into s*, peer into d*. Ports in host order. */
static __always_inline void tapio_sk_tuple(struct sock *sk, __u16 *family, __u8 *saddr, __u16 *sport,
					   __u8 *daddr, __u16 *dport)
{
	*family = BPF_CORE_READ(sk, __sk_common.skc_family);
	*sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	/* A socket moved to CLOSE has given its port back (skc_num 0), e.g. the
	 * abortive close that sends a RST; inet_sport still holds it. */
	if (*sport == 0 && tapio_sk_full(sk))
		*sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	*dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (*family == AF_INET) {
		bpf_core_read(saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(daddr, 4, &sk->__sk_common.skc_daddr);
	} else if (*family == AF_INET6 && bpf_core_field_exists(sk->__sk_common.skc_v6_daddr)) {
		bpf_core_read(saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(daddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

/* ---- Packets ---- */

struct tapio_pkt {
	__u16 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Parses the IPv4/IPv6 header at skb->network_header and the TCP/UDP ports
 * after it (IPv6 extension headers are not walked; fragments after the first
 * have no ports). false when there is no usable network header. */
static __always_inline bool tapio_parse_skb(struct sk_buff *skb, __u16 l3, struct tapio_pkt *pkt)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 nh = BPF_CORE_READ(skb, network_header);
	__u32 th;
	__u8 ports[14];

	if (!head || nh == (__u16)~0U)
		return false;
	if (l3 == ETH_P_IP) {
		struct iphdr iph;

		if (bpf_probe_read_kernel(&iph, sizeof(iph), head + nh))
			return false;
		if (iph.version != 4)
			return false;
		pkt->family = AF_INET;
		pkt->protocol = iph.protocol;
		__builtin_memcpy(pkt->saddr, &iph.saddr, 4);
		__builtin_memcpy(pkt->daddr, &iph.daddr, 4);
		if (bpf_ntohs(iph.frag_off) & 0x1FFF)
			return true;
		th = nh + iph.ihl * 4;
	} else if (l3 == ETH_P_IPV6) {
		struct ipv6hdr ip6;

		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return false;
		if (ip6.version != 6)
			return false;
		pkt->family = AF_INET6;
		pkt->protocol = ip6.nexthdr;
		__builtin_memcpy(pkt->saddr, &ip6.saddr, 16);
		__builtin_memcpy(pkt->daddr, &ip6.daddr, 16);
		th = nh + sizeof(ip6);
	} else {
		return false;
	}
	if (pkt->protocol == IPPROTO_TCP_) {
		if (bpf_probe_read_kernel(ports, 14, head + th))
			return true;
		pkt->tcp_flags = ports[13];
	} else if (pkt->protocol == IPPROTO_UDP_) {
		if (bpf_probe_read_kernel(ports, 4, head + th))
			return true;
	} else {
		return true;
	}
	pkt->sport = ((__u16)ports[0] << 8) | ports[1];
	pkt->dport = ((__u16)ports[2] << 8) | ports[3];
	return true;
}

static __always_inline __u32 tapio_skb_netns(struct sk_buff *skb, struct sock *sk)
{
	struct net_device *dev = BPF_CORE_READ(skb, dev);

	if (dev)
		return BPF_CORE_READ(dev, nd_net.net, ns.inum);
	if (sk)
		return tapio_sk_netns(sk);
	return 0;
}


#define TAPIO_GEN_MAP(name, gen) ((gen) ? (void *)&name##1 : (void *)&name##0)

/* ---- Aggregation ---- */

/* Adds one occurrence: creates the entry from `init` (count already 1) when
 * the key is new, else returns the entry for the caller to update. NULL
 * means done (created) or lost (counted). */
static __always_inline void *tapio_agg(void *map, const void *key, const void *init, __u32 kind)
{
	void *value = bpf_map_lookup_elem(map, key);
	long err;

	if (value)
		return value;
	if (!tapio_rate_ok(kind))
		return NULL;
	err = bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	if (err == 0)
		return NULL;
	if (err == -17 /* EEXIST: another CPU created it */)
		return bpf_map_lookup_elem(map, key);
	tapio_count_drop(kind, TAPIO_DROP_MAP_FULL);
	return NULL;
}

static __always_inline void tapio_max(__u64 *slot, __u64 value)
{
	if (value > *slot)
		*slot = value;
}

/* ---- tcp_connect ---- */

static __always_inline void tapio_connect_done(struct trace_event_raw_inet_sock_set_state *ctx, struct sock *sk,
					       __u8 outcome, __s32 error)
{
	struct tapio_net_connect_key key = {};
	struct tapio_net_connect_value init = {};
	struct tapio_net_connect_value *value;
	struct connect_start *start;
	__u64 skey = (__u64)sk;
	__u64 now, latency, *busy;
	__u32 gen;

	start = bpf_map_lookup_elem(&connecting, &skey);
	if (!start)
		return;
	now = bpf_ktime_get_ns();
	latency = now - start->ts_ns;
	key.cgroup_id = start->cgroup_id;
	key.netns = tapio_sk_netns(sk);
	key.family = ctx->family;
	key.dport = ctx->dport;
	if (key.family == AF_INET)
		bpf_core_read(key.daddr, 4, &ctx->daddr);
	else
		bpf_core_read(key.daddr, 16, &ctx->daddr_v6);
	key.outcome = outcome;

	init.count = 1;
	init.first_ts_ns = now;
	init.first_latency_ns = latency;
	init.latency_ns_total = latency;
	init.latency_ns_max = latency;
	init.pid = start->pid;
	init.tid = start->tid;
	init.uid = start->uid;
	init.error = error;
	init.sport = ctx->sport;
	__builtin_memcpy(init.comm, start->comm, sizeof(init.comm));
	bpf_map_delete_elem(&connecting, &skey);

	busy = tapio_gen_enter(&gen, TAPIO_KIND_TCP_CONNECT);
	if (!busy)
		return;
	value = tapio_agg(TAPIO_GEN_MAP(connect_agg, gen), &key, &init, TAPIO_KIND_TCP_CONNECT);
	if (value) {
		__sync_fetch_and_add(&value->count, 1);
		__sync_fetch_and_add(&value->latency_ns_total, latency);
		tapio_max(&value->latency_ns_max, latency);
	}
	tapio_gen_exit(busy);
}

/* connect(): CLOSE -> SYN_SENT in the caller's context; the handshake ends
 * in softirq (ESTABLISHED, or CLOSE after a RST/ICMP error) or in a timer
 * or the caller's close() (CLOSE). */
SEC("tracepoint/sock/inet_sock_set_state")
int handle_connect_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	int oldstate = ctx->oldstate, newstate = ctx->newstate;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_CONNECT) || ctx->protocol != IPPROTO_TCP_)
		return 0;
	if (oldstate == TCP_CLOSE_ && newstate == TCP_SYN_SENT_) {
		struct connect_start start = {};
		__u64 pid_tgid, skey = (__u64)sk;

		if (!tapio_current_in_scope() || !tapio_netns_ok(tapio_sk_netns(sk)))
			return 0;
		pid_tgid = bpf_get_current_pid_tgid();
		start.ts_ns = bpf_ktime_get_ns();
		start.cgroup_id = bpf_get_current_cgroup_id();
		start.pid = pid_tgid >> 32;
		start.tid = (__u32)pid_tgid;
		start.uid = (__u32)bpf_get_current_uid_gid();
		bpf_get_current_comm(start.comm, sizeof(start.comm));
		bpf_map_update_elem(&connecting, &skey, &start, BPF_ANY);
		return 0;
	}
	if (oldstate != TCP_SYN_SENT_)
		return 0;
	if (newstate == TCP_ESTABLISHED_) {
		tapio_connect_done(ctx, sk, TAPIO_CONNECT_ESTABLISHED, 0);
	} else if (newstate == TCP_CLOSE_) {
		int err = BPF_CORE_READ(sk, sk_err);
		__u8 outcome;

		if (err == ECONNREFUSED)
			outcome = TAPIO_CONNECT_REFUSED;
		else if (err == ECONNRESET)
			outcome = TAPIO_CONNECT_RESET;
		else if (err == ETIMEDOUT || err == 0)
			outcome = TAPIO_CONNECT_TIMEOUT;
		else
			outcome = TAPIO_CONNECT_ERROR;
		tapio_connect_done(ctx, sk, outcome, err);
	}
	return 0;
}

/* ---- tcp_listen ---- */

/* listen() and the close of a listener run in the owner's context (also
 * when the owner is being killed: the exiting task closes its files). */
SEC("tracepoint/sock/inet_sock_set_state")
int handle_listen_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct tapio_event *event;
	__u8 open;
	__u32 netns;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_LISTEN) || ctx->protocol != IPPROTO_TCP_)
		return 0;
	if (ctx->oldstate == TCP_CLOSE_ && ctx->newstate == TCP_LISTEN_)
		open = 1;
	else if (ctx->oldstate == TCP_LISTEN_ && ctx->newstate == TCP_CLOSE_)
		open = 0;
	else
		return 0;
	if (!tapio_current_in_scope())
		return 0;
	netns = tapio_sk_netns(sk);
	if (!tapio_netns_ok(netns) || !tapio_rate_ok(TAPIO_KIND_TCP_LISTEN))
		return 0;
	event = tapio_reserve(TAPIO_KIND_TCP_LISTEN);
	if (!event)
		return 0;
	tapio_fill_current(event);
	event->u.tcp.op = TAPIO_TCP_LISTEN;
	event->u.tcp.state = open;
	event->u.tcp.family = ctx->family;
	event->u.tcp.sport = ctx->sport;
	event->u.tcp.netns = netns;
	event->u.tcp.count = 1;
	if (ctx->family == AF_INET)
		bpf_core_read(event->u.tcp.saddr, 4, &ctx->saddr);
	else
		bpf_core_read(event->u.tcp.saddr, 16, &ctx->saddr_v6);
	tapio_submit(event);
	return 0;
}

/* ---- tcp_reset ---- */

/* The start of tcp_send_reset's and tcp_receive_reset's records: a pointer
 * (or two) right after the common header in every format since 4.x. */
struct tapio_tp_skb_sk {
	__u64 common;
	const void *skbaddr;
	const void *skaddr;
};

struct tapio_tp_sk {
	__u64 common;
	const void *skaddr;
};

static __always_inline void tapio_reset_add(struct tapio_net_flow_key *key, __u32 state)
{
	struct tapio_net_count_value init = {};
	struct tapio_net_count_value *value;
	__u64 *busy;
	__u32 gen;

	if (!tapio_netns_ok(key->netns))
		return;
	init.count = 1;
	init.first_ts_ns = bpf_ktime_get_ns();
	init.state = state;
	busy = tapio_gen_enter(&gen, TAPIO_KIND_TCP_RESET);
	if (!busy)
		return;
	value = tapio_agg(TAPIO_GEN_MAP(reset_agg, gen), key, &init, TAPIO_KIND_TCP_RESET);
	if (value) {
		__sync_fetch_and_add(&value->count, 1);
		value->state = state;
	}
	tapio_gen_exit(busy);
}

/* A RST sent: for a segment of a connection (sk set, tuple from it), or for
 * a segment nothing owns (no sk, or a listener): then the tuple is the
 * reversed tuple of that incoming segment, whose sender started it, so its
 * port is ephemeral and kept as 0. */
SEC("tracepoint/tcp/tcp_send_reset")
int handle_send_reset(struct tapio_tp_skb_sk *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct sk_buff *skb = (struct sk_buff *)ctx->skbaddr;
	struct tapio_net_flow_key key = {};
	__u32 state = 0;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_RESET))
		return 0;
	if (!tapio_sk_scope(sk, &key.cgroup_id))
		return 0;
	key.tag = 1;
	if (sk)
		state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (sk && state != TCP_LISTEN_) {
		tapio_sk_tuple(sk, &key.family, key.saddr, &key.sport, key.daddr, &key.dport);
		key.netns = tapio_sk_netns(sk);
	} else if (skb) {
		struct tapio_pkt pkt = {};

		if (!tapio_parse_skb(skb, bpf_ntohs(BPF_CORE_READ(skb, protocol)), &pkt))
			return 0;
		key.family = pkt.family;
		__builtin_memcpy(key.saddr, pkt.daddr, 16);
		__builtin_memcpy(key.daddr, pkt.saddr, 16);
		key.sport = pkt.dport;
		key.netns = tapio_skb_netns(skb, sk);
	} else {
		return 0;
	}
	tapio_reset_add(&key, state);
	return 0;
}

/* A RST received on a socket (always set). While connecting, the local port
 * is ephemeral and kept as 0 (tcp_connect reports the refusal per attempt). */
SEC("tracepoint/tcp/tcp_receive_reset")
int handle_receive_reset(struct tapio_tp_sk *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct tapio_net_flow_key key = {};
	__u32 state;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_RESET) || !sk)
		return 0;
	if (!tapio_sk_scope(sk, &key.cgroup_id))
		return 0;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	tapio_sk_tuple(sk, &key.family, key.saddr, &key.sport, key.daddr, &key.dport);
	if (state == TCP_SYN_SENT_)
		key.sport = 0;
	key.netns = tapio_sk_netns(sk);
	tapio_reset_add(&key, state);
	return 0;
}

/* ---- tcp_retransmit ---- */

SEC("tracepoint/tcp/tcp_retransmit_skb")
int handle_retransmit(struct tapio_tp_skb_sk *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct tapio_net_flow_key key = {};
	struct tapio_net_count_value init = {};
	struct tapio_net_count_value *value;
	__u32 state, gen;
	__u64 *busy;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_RETRANSMIT) || !sk)
		return 0;
	if (!tapio_sk_scope(sk, &key.cgroup_id))
		return 0;
	key.netns = tapio_sk_netns(sk);
	if (!tapio_netns_ok(key.netns))
		return 0;
	tapio_sk_tuple(sk, &key.family, key.saddr, &key.sport, key.daddr, &key.dport);
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	init.count = 1;
	init.first_ts_ns = bpf_ktime_get_ns();
	init.state = state;
	busy = tapio_gen_enter(&gen, TAPIO_KIND_TCP_RETRANSMIT);
	if (!busy)
		return 0;
	value = tapio_agg(TAPIO_GEN_MAP(retransmit_agg, gen), &key, &init, TAPIO_KIND_TCP_RETRANSMIT);
	if (value) {
		__sync_fetch_and_add(&value->count, 1);
		value->state = state;
	}
	tapio_gen_exit(busy);
	return 0;
}

/* ---- tcp_latency ---- */

/* Registers established sockets in scope with their role; forgets them at
 * CLOSE. Client: active open (SYN_SENT -> ESTABLISHED); server: passive
 * open (SYN_RECV -> ESTABLISHED, the accepted child). */
SEC("tracepoint/sock/inet_sock_set_state")
int handle_latency_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	__u64 skey = (__u64)sk;
	struct conn_state state = {};
	__u64 cgroup_id;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_LATENCY) || ctx->protocol != IPPROTO_TCP_)
		return 0;
	if (ctx->newstate == TCP_CLOSE_) {
		bpf_map_delete_elem(&conns, &skey);
		return 0;
	}
	if (ctx->newstate != TCP_ESTABLISHED_)
		return 0;
	if (ctx->oldstate == TCP_SYN_SENT_)
		state.role = TAPIO_NET_ROLE_CLIENT;
	else if (ctx->oldstate == TCP_SYN_RECV_)
		state.role = TAPIO_NET_ROLE_SERVER;
	else
		return 0;
	if (!tapio_sk_scope(sk, &cgroup_id) || !tapio_netns_ok(tapio_sk_netns(sk)))
		return 0;
	state.sport = ctx->sport;
	state.dport = ctx->dport;
	bpf_map_update_elem(&conns, &skey, &state, BPF_ANY);
	return 0;
}

static __always_inline void tapio_latency_response(struct sock *sk, __u8 role, __u64 response_ns)
{
	struct tapio_net_flow_key key = {};
	struct tapio_net_latency_value init = {};
	struct tapio_net_latency_value *value;
	__u64 srtt, *busy;
	__u32 gen;

	if (!tapio_sk_scope(sk, &key.cgroup_id))
		return;
	key.netns = tapio_sk_netns(sk);
	if (!tapio_netns_ok(key.netns))
		return;
	key.tag = role;
	tapio_sk_tuple(sk, &key.family, key.saddr, &key.sport, key.daddr, &key.dport);
	if (role == TAPIO_NET_ROLE_CLIENT)
		key.sport = 0;
	else
		key.dport = 0;
	srtt = BPF_CORE_READ((struct tcp_sock *)sk, srtt_us) >> 3;
	init.responses = 1;
	init.response_ns_total = response_ns;
	init.response_ns_max = response_ns;
	init.srtt_us_total = srtt;
	init.srtt_samples = 1;
	init.first_ts_ns = bpf_ktime_get_ns();
	busy = tapio_gen_enter(&gen, TAPIO_KIND_TCP_LATENCY);
	if (!busy)
		return;
	value = tapio_agg(TAPIO_GEN_MAP(latency_agg, gen), &key, &init, TAPIO_KIND_TCP_LATENCY);
	if (value) {
		__sync_fetch_and_add(&value->responses, 1);
		__sync_fetch_and_add(&value->response_ns_total, response_ns);
		tapio_max(&value->response_ns_max, response_ns);
		__sync_fetch_and_add(&value->srtt_us_total, srtt);
		__sync_fetch_and_add(&value->srtt_samples, 1);
	}
	tapio_gen_exit(busy);
}

/* The request/response rule, per socket: the side that asks (client) starts
 * a request with its first send after a receive (or the first send) and sees
 * the response with its first receive after that; the side that answers
 * (server) starts with its first receive after a send and answers with its
 * first send. Response time = that receive (send) - the request start. */
static __always_inline void tapio_latency_io(struct trace_event_raw_sock_msg_length *ctx, bool send)
{
	struct sock *sk = (struct sock *)ctx->sk;
	__u64 skey = (__u64)sk;
	struct conn_state *state;
	bool asks;
	__u64 now;

	if (!tapio_kind_enabled(TAPIO_KIND_TCP_LATENCY) || ctx->protocol != IPPROTO_TCP_ || ctx->ret <= 0)
		return;
	if (!send && (ctx->flags & MSG_PEEK))
		return;
	state = bpf_map_lookup_elem(&conns, &skey);
	if (!state)
		return;
	/* Another connection at a registered socket's address: the entry is
	 * stale (its socket went without a CLOSE seen here). */
	if (BPF_CORE_READ(sk, __sk_common.skc_num) != state->sport ||
	    bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport)) != state->dport) {
		bpf_map_delete_elem(&conns, &skey);
		return;
	}
	now = bpf_ktime_get_ns();
	asks = (state->role == TAPIO_NET_ROLE_CLIENT) == send;
	if (asks) {
		if (state->request_ts_ns == 0)
			state->request_ts_ns = now;
		return;
	}
	if (state->request_ts_ns == 0)
		return;
	tapio_latency_response(sk, state->role, now - state->request_ts_ns);
	state->request_ts_ns = 0;
}

SEC("tracepoint/sock/sock_send_length")
int handle_send_length(struct trace_event_raw_sock_msg_length *ctx)
{
	tapio_latency_io(ctx, true);
	return 0;
}

SEC("tracepoint/sock/sock_recv_length")
int handle_recv_length(struct trace_event_raw_sock_msg_length *ctx)
{
	tapio_latency_io(ctx, false);
	return 0;
}

/* ---- packet_drop ---- */

SEC("tracepoint/skb/kfree_skb")
int handle_kfree_skb(struct trace_event_raw_kfree_skb *ctx)
{
	struct sk_buff *skb = (struct sk_buff *)ctx->skbaddr;
	struct tapio_net_drop_key key = {};
	struct tapio_net_count_value init = {};
	struct tapio_net_count_value *value;
	struct tapio_pkt pkt = {};
	struct sock *sk = NULL;
	__u32 reason, gen;
	__u64 *busy;
	__u8 *ignored;

	if (!tapio_kind_enabled(TAPIO_KIND_PACKET_DROP))
		return 0;
	/* Before 5.17 there is no reason: every free looks alike, report none. */
	if (!bpf_core_field_exists(ctx->reason))
		return 0;
	reason = ctx->reason;
	ignored = bpf_map_lookup_elem(&drop_reason_ignored, &reason);
	if (ignored && *ignored)
		return 0;
	if (bpf_core_field_exists(ctx->rx_sk))
		sk = (struct sock *)ctx->rx_sk;
	if (!sk)
		sk = BPF_CORE_READ(skb, sk);
	if (!tapio_sk_scope(sk, &key.cgroup_id))
		return 0;
	key.netns = tapio_skb_netns(skb, sk);
	if (!tapio_netns_ok(key.netns))
		return 0;
	key.reason = reason;
	if (tapio_parse_skb(skb, ctx->protocol, &pkt)) {
		key.family = pkt.family;
		key.protocol = pkt.protocol;
		__builtin_memcpy(key.saddr, pkt.saddr, 16);
		__builtin_memcpy(key.daddr, pkt.daddr, 16);
		/* The sender of a SYN started the connection: its port is
		 * ephemeral, and a SYN storm would otherwise make one key per
		 * attempt. */
		key.sport = (pkt.tcp_flags & 0x12) == 0x02 ? 0 : pkt.sport;
		key.dport = pkt.dport;
	}
	init.count = 1;
	init.first_ts_ns = bpf_ktime_get_ns();
	busy = tapio_gen_enter(&gen, TAPIO_KIND_PACKET_DROP);
	if (!busy)
		return 0;
	value = tapio_agg(TAPIO_GEN_MAP(drop_agg, gen), &key, &init, TAPIO_KIND_PACKET_DROP);
	if (value)
		__sync_fetch_and_add(&value->count, 1);
	tapio_gen_exit(busy);
	return 0;
}
