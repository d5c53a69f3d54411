// SPDX-License-Identifier: GPL-2.0
/* DNS over UDP: each query matched to its answer, or to nothing.
 *
 * cgroup_skb programs attached to one cgroup2 directory see the packets of
 * every socket created in its subtree, starting at the IP header. Egress
 * keeps each query in a pending table; ingress matches the response, emits
 * one event with the rcode, the latency and up to four A/AAAA answers, and
 * forgets the query. Queries that never get an answer are emitted by the
 * loader (Sources/CTapioBPF/dns.c) after its timeout. Both programs only
 * observe: they always return 1 (pass).
 *
 * The egress hook runs after netfilter's OUTPUT and POSTROUTING: a query
 * dropped there is never seen (the sender gets EPERM), and a query that
 * local DNAT sends elsewhere is seen with its new destination.
 *
 * Not covered: DNS over TCP (also the retry after a truncated UDP answer),
 * DoT/DoH, IPv6 extension headers before UDP, fragmented queries (responses
 * are reassembled before the ingress hook runs), EDNS extended rcodes (only
 * the 4 header bits).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

#include "common.bpf.h"
#include "tapio_dns.h"

char LICENSE[] SEC("license") = "GPL";

#define TAPIO_AF_INET 2
#define TAPIO_AF_INET6 10
#define TAPIO_IPPROTO_UDP 17

#define DNS_HEADER_LEN 12
#define DNS_FLAG_QR 0x8000
#define DNS_OPCODE(flags) (((flags) >> 11) & 0xf)
#define DNS_RCODE(flags) ((flags) & 0xf)
#define DNS_TYPE_A 1
#define DNS_TYPE_AAAA 28
#define DNS_CLASS_IN 1
#define DNS_MAX_ANSWERS 4
/* Loop steps for the answer section: a record, or a label of an owner name
 * that is not compressed. */
#define DNS_MAX_STEPS 48

/* Server port that marks DNS traffic (host order). */
const volatile __u16 dns_port = 53;
/* Set by the loader when cgroup_skb programs may call bpf_get_current_task
 * and bpf_probe_read_kernel here (CAP_PERFMON, kernel support); when 0 the
 * verifier prunes that code, so the program loads without them. */
const volatile bool have_current_task = false;

/* Queries in flight. A plain hash, not an LRU: an LRU would evict a query
 * silently and it would never produce its timeout event; a full hash refuses
 * the new query, which is counted (TAPIO_DROP_MAP_FULL). Not preallocated:
 * the loader may size it large, memory follows the queries in flight. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TAPIO_DNS_DEFAULT_MAX_PENDING);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tapio_dns_pending_key);
	__type(value, struct tapio_dns_pending);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAPIO_DNS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} dns_stats SEC(".maps");

/* Per-CPU room for the query being built and the wire name (too big for the
 * 512-byte stack). */
struct dns_scratch {
	struct tapio_dns_pending query;
	__u8 wire[TAPIO_DNS_WIRE_NAME_MAX + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_scratch);
} scratch SEC(".maps");

struct dns_header {
	__be16 id;
	__be16 flags;
	__be16 qdcount;
	__be16 ancount;
	__be16 nscount;
	__be16 arcount;
};

/* The parts of an IP/UDP/DNS packet both directions need. */
struct dns_packet {
	__u16 family;
	__u16 sport;
	__u16 dport;
	__u16 id;
	__u16 flags;
	__u16 qdcount;
	__u16 ancount;
	__u16 _pad;
	__u32 dns_off; /* offset of the DNS header from the IP header */
	__u8 saddr[16];
	__u8 daddr[16];
};

static __always_inline void dns_count(__u32 stat)
{
	__u64 *count = bpf_map_lookup_elem(&dns_stats, &stat);

	if (count)
		__sync_fetch_and_add(count, 1);
}

/* Parses IPv4 or IPv6 (no extension headers), UDP, and the DNS header. Only
 * datagrams from or to dns_port are parsed; returns 0 for those that pass,
 * 1 for traffic that is not DNS, -1 for malformed DNS-port datagrams. */
static __always_inline int dns_parse(struct __sk_buff *skb, struct dns_packet *pkt)
{
	struct dns_header dns;
	__u8 version;
	__u32 l4_off;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, 0, &version, 1))
		return 1;
	version >>= 4;
	if (version == 4) {
		__u8 ip[20];
		__u16 frag;

		if (bpf_skb_load_bytes(skb, 0, ip, sizeof(ip)))
			return 1;
		if (ip[9] != TAPIO_IPPROTO_UDP)
			return 1;
		/* Fragments other than a whole datagram are skipped. */
		frag = ((__u16)ip[6] << 8) | ip[7];
		if (frag & 0x3fff)
			return 1;
		l4_off = (ip[0] & 0xf) * 4;
		if (l4_off < 20)
			return 1;
		pkt->family = TAPIO_AF_INET;
		__builtin_memcpy(pkt->saddr, &ip[12], 4);
		__builtin_memcpy(pkt->daddr, &ip[16], 4);
	} else if (version == 6) {
		__u8 ip6[40];

		if (bpf_skb_load_bytes(skb, 0, ip6, sizeof(ip6)))
			return 1;
		if (ip6[6] != TAPIO_IPPROTO_UDP)
			return 1;
		l4_off = 40;
		pkt->family = TAPIO_AF_INET6;
		__builtin_memcpy(pkt->saddr, &ip6[8], 16);
		__builtin_memcpy(pkt->daddr, &ip6[24], 16);
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)))
		return 1;
	pkt->sport = bpf_ntohs(ports[0]);
	pkt->dport = bpf_ntohs(ports[1]);
	if (pkt->sport != dns_port && pkt->dport != dns_port)
		return 1;
	pkt->dns_off = l4_off + 8;
	if (bpf_skb_load_bytes(skb, pkt->dns_off, &dns, sizeof(dns)))
		return -1;
	pkt->id = bpf_ntohs(dns.id);
	pkt->flags = bpf_ntohs(dns.flags);
	pkt->qdcount = bpf_ntohs(dns.qdcount);
	pkt->ancount = bpf_ntohs(dns.ancount);
	return 0;
}

static __always_inline __u8 dns_name_char(__u8 c)
{
	if (c >= 'A' && c <= 'Z')
		return c + ('a' - 'A');
	/* Keeps the result one printable string. */
	if (c <= ' ' || c >= 0x7f)
		return '?';
	return c;
}

/* Reads the first question's name (uncompressed labels, as every query
 * has) into q->name, dotted, lowercased and cut to TAPIO_DNS_NAME_LEN - 1
 * characters, and its type. Returns 0, or -1 when it is malformed.
 *
 * Two simple passes keep the verifier's work small: the first follows the
 * label lengths and overwrites each with '.', the second copies the bytes.
 * A '.' inside a label (legal, never seen in practice) reads as a separator. */
static __always_inline int dns_read_question(struct __sk_buff *skb, struct dns_scratch *s, __u32 off)
{
	struct tapio_dns_pending *q = &s->query;
	__u32 avail, i, pos = 0;
	__be16 qtype;
	bool done = false;

	if (skb->len <= off)
		return -1;
	avail = skb->len - off;
	if (avail > TAPIO_DNS_WIRE_NAME_MAX)
		avail = TAPIO_DNS_WIRE_NAME_MAX;
	/* Re-bound on the register the helper gets. */
	barrier_var(avail);
	if (avail < 1 || avail > TAPIO_DNS_WIRE_NAME_MAX)
		return -1;
	if (bpf_skb_load_bytes(skb, off, s->wire, avail))
		return -1;

	/* A name has at most 127 labels of 1 byte. */
	for (i = 0; i < 128; i++) {
		__u8 len;

		if (pos >= avail)
			return -1;
		len = s->wire[pos & TAPIO_DNS_WIRE_NAME_MAX];
		if (len == 0) {
			done = true;
			break;
		}
		/* Compression pointers or extended labels: not in a query. */
		if (len & 0xc0)
			return -1;
		s->wire[pos & TAPIO_DNS_WIRE_NAME_MAX] = '.';
		pos += len + 1;
	}
	if (!done)
		return -1;
	if (pos == 0) {
		q->name[0] = '.'; /* the root */
	} else {
		/* wire[1 .. pos) is the dotted name; the name was zeroed, so
		 * it stays NUL-terminated. */
		for (i = 1; i < TAPIO_DNS_NAME_LEN; i++) {
			__u8 c;

			if (i >= pos)
				break;
			c = s->wire[i & TAPIO_DNS_WIRE_NAME_MAX];
			q->name[(i - 1) & (TAPIO_DNS_NAME_LEN - 1)] = c == '.' ? c : dns_name_char(c);
		}
	}
	if (bpf_skb_load_bytes(skb, off + pos + 1, &qtype, sizeof(qtype)))
		return -1;
	q->qtype = bpf_ntohs(qtype);
	q->qname_wire_len = pos + 1;
	return 0;
}

/* pid, tid, ppid, comm and netns of the sender, when the packet is being sent
 * in the context of a task of the socket's cgroup: a UDP sendmsg() runs the
 * egress hook in the caller's context; a packet sent from softirq would find
 * an unrelated task here, which the cgroup check turns away. */
static __always_inline void dns_fill_task(struct tapio_dns_pending *q)
{
	struct task_struct *task;

	if (!have_current_task)
		return;
	task = (struct task_struct *)bpf_get_current_task();
	if (!task || BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id) != q->cgroup_id)
		return;
	q->pid = BPF_CORE_READ(task, tgid);
	q->tid = BPF_CORE_READ(task, pid);
	q->ppid = BPF_CORE_READ(task, real_parent, tgid);
	q->netns = BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
	BPF_CORE_READ_STR_INTO(&q->comm, task, comm);
}

SEC("cgroup_skb/egress")
int dns_egress(struct __sk_buff *skb)
{
	struct tapio_dns_pending_key key = {};
	struct dns_packet pkt = {};
	struct dns_scratch *s;
	__u32 zero = 0;
	long rc;

	rc = dns_parse(skb, &pkt);
	if (rc > 0 || pkt.dport != dns_port)
		return 1;
	if (rc < 0)
		goto malformed;
	/* A standard query with a question. */
	if ((pkt.flags & DNS_FLAG_QR) || DNS_OPCODE(pkt.flags) != 0 || pkt.qdcount == 0)
		return 1;
	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return 1;
	__builtin_memset(&s->query, 0, sizeof(s->query));
	if (dns_read_question(skb, s, pkt.dns_off + DNS_HEADER_LEN))
		goto malformed;

	key.socket_cookie = bpf_get_socket_cookie(skb);
	key.id = pkt.id;
	key.family = pkt.family;

	__builtin_memcpy(s->query.server, pkt.daddr, sizeof(s->query.server));
	s->query.server_port = pkt.dport;
	s->query.ts_ns = bpf_ktime_get_ns();
	s->query.cgroup_id = bpf_skb_cgroup_id(skb);
	s->query.uid = bpf_get_socket_uid(skb);
	dns_fill_task(&s->query);

	rc = bpf_map_update_elem(&pending, &key, &s->query, BPF_NOEXIST);
	if (rc == 0) {
		dns_count(TAPIO_DNS_STAT_QUERIES);
	} else if (rc == -17 /* EEXIST */) {
		dns_count(TAPIO_DNS_STAT_RETRANSMITS);
	} else {
		dns_count(TAPIO_DNS_STAT_PENDING_FULL);
		tapio_count_drop(TAPIO_KIND_DNS, TAPIO_DROP_MAP_FULL);
	}
	return 1;

malformed:
	dns_count(TAPIO_DNS_STAT_MALFORMED);
	return 1;
}

/* Where the next A/AAAA answer goes, or NULL when all slots are taken.
 * The slot is found from the record itself (answer_families is ring buffer
 * memory, unknown to the verifier) rather than from a counter: a counter the
 * verifier knows exactly would be marked precise and multiply the states it
 * explores by every count on every path. */
static __always_inline __u8 *dns_answer_slot(struct tapio_dns_info *info, __u8 family)
{
	if (info->answer_families[0] == 0) {
		info->answer_families[0] = family;
		return info->answers[0];
	}
	if (info->answer_families[1] == 0) {
		info->answer_families[1] = family;
		return info->answers[1];
	}
	if (info->answer_families[2] == 0) {
		info->answer_families[2] = family;
		return info->answers[2];
	}
	if (info->answer_families[3] == 0) {
		info->answer_families[3] = family;
		return info->answers[3];
	}
	return NULL;
}

/* Copies up to four A/AAAA records of the answer section into info. One
 * flat loop, one step per record or per label of an uncompressed owner name,
 * keeps the verifier's work linear: owner names are almost always a single
 * compression pointer, so a step is usually a record. */
static __always_inline void dns_read_answers(struct __sk_buff *skb, struct tapio_dns_info *info,
					     __u32 off, __u16 ancount)
{
	__u32 records_left = ancount;
	int step;

	for (step = 0; step < DNS_MAX_STEPS; step++) {
		struct {
			__be16 type;
			__be16 class;
			__be32 ttl;
			__be16 rdlength;
		} __attribute__((packed)) rr;
		__u16 type, rdlength;
		__u8 len, *slot;

		if (records_left == 0 || info->answer_families[DNS_MAX_ANSWERS - 1] != 0)
			break;
		if (bpf_skb_load_bytes(skb, off, &len, 1))
			break;
		if (len != 0 && (len & 0xc0) == 0) {
			off += len + 1; /* a label of the owner name */
			continue;
		}
		if ((len & 0xc0) == 0xc0)
			off += 2;   /* a compression pointer ends the name */
		else if (len == 0)
			off += 1;   /* the root ends it */
		else
			break;      /* extended label types: give up */
		if (bpf_skb_load_bytes(skb, off, &rr, sizeof(rr)))
			break;
		off += sizeof(rr);
		records_left--;
		type = bpf_ntohs(rr.type);
		rdlength = bpf_ntohs(rr.rdlength);
		if (bpf_ntohs(rr.class) == DNS_CLASS_IN) {
			if (type == DNS_TYPE_A && rdlength == 4) {
				slot = dns_answer_slot(info, TAPIO_AF_INET);
				if (!slot || bpf_skb_load_bytes(skb, off, slot, 4))
					break;
			} else if (type == DNS_TYPE_AAAA && rdlength == 16) {
				slot = dns_answer_slot(info, TAPIO_AF_INET6);
				if (!slot || bpf_skb_load_bytes(skb, off, slot, 16))
					break;
			}
		}
		off += rdlength;
	}
}

SEC("cgroup_skb/ingress")
int dns_ingress(struct __sk_buff *skb)
{
	struct tapio_dns_pending_key key = {};
	struct dns_packet pkt = {};
	struct tapio_dns_pending *q;
	struct tapio_event *event;
	struct tapio_dns_info *info;
	__u64 now;
	__u32 off;
	long rc;

	rc = dns_parse(skb, &pkt);
	if (rc > 0 || pkt.sport != dns_port)
		return 1;
	if (rc < 0) {
		dns_count(TAPIO_DNS_STAT_MALFORMED);
		return 1;
	}
	if (!(pkt.flags & DNS_FLAG_QR))
		return 1;

	key.socket_cookie = bpf_get_socket_cookie(skb);
	key.id = pkt.id;
	key.family = pkt.family;
	q = bpf_map_lookup_elem(&pending, &key);
	if (!q) {
		dns_count(TAPIO_DNS_STAT_UNMATCHED);
		return 1;
	}
	now = bpf_ktime_get_ns();

	event = tapio_reserve(TAPIO_KIND_DNS);
	if (!event) {
		/* Counted as a drop; forgetting the query keeps it from
		 * turning into a false timeout. */
		bpf_map_delete_elem(&pending, &key);
		return 1;
	}
	event->ts_ns = now;
	event->pid = q->pid;
	event->tid = q->tid;
	event->ppid = q->ppid;
	event->uid = q->uid;
	event->cgroup_id = q->cgroup_id;
	__builtin_memcpy(event->comm, q->comm, sizeof(event->comm));
	info = &event->u.dns;
	info->family = pkt.family;
	/* The server the query was sent to, as the timeout event reports it
	 * too; behind local DNAT the answer's source address differs. */
	info->server_port = q->server_port;
	info->id = pkt.id;
	info->qtype = q->qtype;
	info->rcode = DNS_RCODE(pkt.flags);
	info->netns = q->netns;
	info->latency_ns = now - q->ts_ns;
	__builtin_memcpy(info->server, q->server, sizeof(info->server));
	__builtin_memcpy(info->name, q->name, sizeof(info->name));
	off = q->qname_wire_len;

	/* The loader's timeout scan may have taken the query meanwhile: only
	 * the side whose delete succeeds emits it. */
	if (bpf_map_delete_elem(&pending, &key)) {
		bpf_ringbuf_discard(event, 0);
		dns_count(TAPIO_DNS_STAT_UNMATCHED);
		return 1;
	}
	dns_count(TAPIO_DNS_STAT_ANSWERS);

	/* The answer section follows the one question, whose name the
	 * response repeats as it was sent. */
	if (pkt.qdcount == 1 && pkt.ancount > 0)
		dns_read_answers(skb, info, pkt.dns_off + DNS_HEADER_LEN + off + 4, pkt.ancount);
	tapio_submit(event);
	return 1;
}
