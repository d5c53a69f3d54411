/* The one shape of a harvested aggregate: what an aggregation map folded
 * over one interval, read out by its loader (tapio_net_harvest,
 * tapio_io_harvest) and handed to user space. Ring-buffer records are
 * struct tapio_event (tapio_events.h); everything folded in the kernel
 * arrives as this struct, whichever object folded it.
 *
 * Common fields describe the interval and whom it is about; the rest
 * belongs to the kinds named next to them and is zero otherwise.
 */
#ifndef TAPIO_AGGREGATE_H
#define TAPIO_AGGREGATE_H

#include <stdint.h>

#include "tapio_events.h"

#ifdef __cplusplus
extern "C" {
#endif

struct tapio_aggregate {
	uint32_t kind;              /* enum tapio_event_kind */
	uint32_t netns;             /* network kinds: the namespace inode, 0 if unknown */
	uint64_t cgroup_id;         /* cgroup v2 id, 0 if unknown */
	uint64_t first_ts_ns;       /* CLOCK_MONOTONIC of the first occurrence in the interval */
	uint64_t interval_start_ns; /* CLOCK_MONOTONIC: the previous harvest (or the open) */
	uint64_t interval_end_ns;   /* CLOCK_MONOTONIC: this harvest */
	uint64_t count;             /* occurrences folded (retransmits, drops, failures; tcp_latency: responses) */

	/* Network kinds: the flow. */
	uint16_t family;
	uint16_t sport;
	uint16_t dport;
	uint8_t protocol;           /* IPPROTO_TCP for the TCP kinds */
	uint8_t role;               /* tcp_latency: enum tapio_net_role */
	uint8_t saddr[16];
	uint8_t daddr[16];
	uint32_t state;             /* tcp_retransmit: TCP state at the last retransmit */
	uint32_t drop_reason;       /* packet_drop: the kernel's enum value */
	uint64_t srtt_us;           /* tcp_latency: mean smoothed RTT over the responses */
	uint64_t responses;
	uint64_t response_ns_total;
	uint64_t response_ns_max;
	/* packet_drop: e.g. "NETFILTER_DROP" (enum skb_drop_reason from the
	 * running kernel's BTF, prefix SKB_DROP_REASON_ stripped), or
	 * "UNKNOWN_<value>". */
	char drop_reason_name[64];

	/* Process kinds (io_error): who, and what failed. */
	uint32_t pid;
	uint32_t uid;
	int32_t error;              /* io_error: errno (positive) */
	uint32_t _pad;
	const char *syscall;        /* io_error: name, e.g. "write" (static storage) */
	char comm[TAPIO_COMM_LEN + 1];
};

/* Return 0 to continue; anything else ends the harvest after this aggregate
 * (what is left is delivered by the next one). */
typedef int (*tapio_aggregate_fn)(void *ctx, const struct tapio_aggregate *aggregate);

#ifdef __cplusplus
}
#endif

#endif
