#ifndef TAPIO_COUNTERS_H
#define TAPIO_COUNTERS_H

#include <stdint.h>

/* An atomic add to a 64-bit counter in shared memory (the agent's crash
 * counters, a file mapped MAP_SHARED): callers on different threads need no
 * lock between them. Relaxed: the counter orders nothing else. */
static inline void tapio_counter_add(uint64_t *counter, uint64_t n)
{
	__atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

#endif
