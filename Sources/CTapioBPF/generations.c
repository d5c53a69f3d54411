#include <sched.h>
#include <time.h>

#include "generations.h"

static uint64_t tapio_monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

bool tapio_wait_retired(const __u64 *busy, uint64_t timeout_ns)
{
	uint64_t deadline = 0;
	unsigned spins = 0;

	while (__atomic_load_n(busy, __ATOMIC_SEQ_CST) != 0) {
		uint64_t now = tapio_monotonic_ns();

		if (deadline == 0)
			deadline = now + timeout_ns;
		else if (now >= deadline)
			return false;
		if (++spins < 64) {
			sched_yield();
		} else {
			struct timespec ts = { 0, 50000 };

			nanosleep(&ts, NULL);
		}
	}
	return true;
}
