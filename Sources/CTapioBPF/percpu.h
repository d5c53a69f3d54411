/* Shared by the loaders: sums per-CPU array slots. Private to CTapioBPF. */
#ifndef TAPIO_PERCPU_H
#define TAPIO_PERCPU_H

#include <stddef.h>
#include <stdint.h>

/* Adds, for keys 0..filled-1 of the per-CPU array map `fd`, the sum over all
 * possible CPUs into out[key]. 0 or -errno. */
int tapio_sum_percpu(int fd, uint64_t *out, size_t filled);

#endif
