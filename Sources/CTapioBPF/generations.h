/* The loader's side of double-buffered aggregation (bpf/generations.bpf.h).
 * Private to CTapioBPF. */
#ifndef TAPIO_GENERATIONS_H
#define TAPIO_GENERATIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <linux/types.h>

/* Waits until no program is adding to a retired generation, whose in-flight
 * counter is *busy (agg_busy[gen] in the object's mmapped .bss). The caller has
 * already made the other generation active with a seq_cst store; this load is
 * seq_cst too, so a program that still uses the retired one is seen here.
 * Yields, then sleeps 50 µs at a time; false after timeout_ns. */
bool tapio_wait_retired(const __u64 *busy, uint64_t timeout_ns);

#endif
