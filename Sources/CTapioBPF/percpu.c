#include <errno.h>
#include <stdlib.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "percpu.h"

int tapio_sum_percpu(int fd, uint64_t *out, size_t filled)
{
	uint64_t *values;
	int cpus, rc = 0;
	uint32_t key;

	cpus = libbpf_num_possible_cpus();
	if (cpus <= 0)
		return cpus < 0 ? cpus : -EINVAL;
	/* A lookup in a per-CPU array returns one 8-byte slot per possible CPU. */
	values = calloc((size_t)cpus, sizeof(*values));
	if (!values)
		return -ENOMEM;
	for (key = 0; key < filled; key++) {
		int cpu;

		if (bpf_map_lookup_elem(fd, &key, values)) {
			rc = -errno;
			break;
		}
		for (cpu = 0; cpu < cpus; cpu++)
			out[key] += values[cpu];
	}
	free(values);
	return rc;
}
