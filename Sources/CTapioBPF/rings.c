#include "tapio_rings.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <bpf/libbpf.h>

#define TAPIO_RINGS_MAX 16

struct tapio_ring {
	struct tapio_rings *owner;
	char name[32];
	uint32_t size;
	uint64_t records;
	/* The ring's consumer and producer pages, mapped read-only for the fill. */
	void *positions;
	size_t positions_len;
};

struct tapio_rings {
	struct ring_buffer *reader;
	int count;
	struct tapio_ring rings[TAPIO_RINGS_MAX];
	uint64_t wakeups;
	/* Set for the duration of one poll. */
	tapio_bpf_event_fn fn;
	void *fn_ctx;
	int delivered;
	bool stopped;
};

static int tapio_rings_on_record(void *ctx, void *data, size_t size)
{
	struct tapio_ring *ring = ctx;
	struct tapio_rings *rings = ring->owner;

	/* Every program emits whole struct tapio_event records; a shorter one
	 * would be read past its end, so it is skipped. */
	if (size < sizeof(struct tapio_event))
		return 0;
	__atomic_store_n(&ring->records, ring->records + 1, __ATOMIC_RELAXED);
	rings->delivered++;
	if (rings->fn(rings->fn_ctx, data) != 0) {
		rings->stopped = true;
		return -ECANCELED;
	}
	return 0;
}

tapio_rings *tapio_rings_new(void)
{
	return calloc(1, sizeof(struct tapio_rings));
}

int tapio_rings_add(tapio_rings *rings, int map_fd, const char *name, uint32_t size_bytes)
{
	struct tapio_ring *ring;
	int rc;

	if (!rings || map_fd < 0)
		return -EINVAL;
	if (rings->count == TAPIO_RINGS_MAX)
		return -E2BIG;
	ring = &rings->rings[rings->count];
	memset(ring, 0, sizeof(*ring));
	ring->owner = rings;
	ring->size = size_bytes;
	strncpy(ring->name, name ? name : "", sizeof(ring->name) - 1);
	if (!rings->reader) {
		rings->reader = ring_buffer__new(map_fd, tapio_rings_on_record, ring, NULL);
		if (!rings->reader)
			return -errno;
	} else {
		rc = ring_buffer__add(rings->reader, map_fd, tapio_rings_on_record, ring);
		if (rc)
			return rc;
	}
	/* Page 0 holds the consumer position, page 1 the producer's; read-only,
	 * they cost no memory (the kernel's pages) and let the fill be read from
	 * any thread. Without them the fill reads 0. */
	ring->positions_len = 2 * (size_t)sysconf(_SC_PAGESIZE);
	ring->positions = mmap(NULL, ring->positions_len, PROT_READ, MAP_SHARED, map_fd, 0);
	if (ring->positions == MAP_FAILED)
		ring->positions = NULL;
	return rings->count++;
}

int tapio_rings_poll(tapio_rings *rings, int timeout_ms, tapio_bpf_event_fn fn, void *ctx)
{
	struct epoll_event events[TAPIO_RINGS_MAX];
	int rc;

	if (!rings || !fn)
		return -EINVAL;
	if (!rings->reader)
		return 0;
	if (timeout_ms != 0) {
		/* Only the wait: which ring woke us does not matter, every ring
		 * is drained below (records below the fill mark sent none). */
		rc = epoll_wait(ring_buffer__epoll_fd(rings->reader), events, TAPIO_RINGS_MAX, timeout_ms);
		if (rc < 0 && errno != EINTR)
			return -errno;
		if (rc > 0)
			__atomic_store_n(&rings->wakeups, rings->wakeups + 1, __ATOMIC_RELAXED);
	}
	rings->fn = fn;
	rings->fn_ctx = ctx;
	rings->delivered = 0;
	rings->stopped = false;
	rc = ring_buffer__consume(rings->reader);
	rings->fn = NULL;
	rings->fn_ctx = NULL;
	if (rc < 0 && !(rc == -ECANCELED && rings->stopped) && rc != -EINTR)
		return rc;
	return rings->delivered;
}

int tapio_rings_count(const tapio_rings *rings)
{
	return rings ? rings->count : 0;
}

const char *tapio_rings_name(const tapio_rings *rings, int index)
{
	return rings && index >= 0 && index < rings->count ? rings->rings[index].name : NULL;
}

uint32_t tapio_rings_size(const tapio_rings *rings, int index)
{
	return rings && index >= 0 && index < rings->count ? rings->rings[index].size : 0;
}

uint64_t tapio_rings_records(const tapio_rings *rings, int index)
{
	return rings && index >= 0 && index < rings->count ? __atomic_load_n(&rings->rings[index].records, __ATOMIC_RELAXED) : 0;
}

uint64_t tapio_rings_fill(const tapio_rings *rings, int index)
{
	const struct tapio_ring *ring;
	uint64_t consumer, producer;

	if (!rings || index < 0 || index >= rings->count || !rings->rings[index].positions)
		return 0;
	ring = &rings->rings[index];
	consumer = __atomic_load_n((const uint64_t *)ring->positions, __ATOMIC_ACQUIRE);
	producer = __atomic_load_n((const uint64_t *)((const char *)ring->positions + ring->positions_len / 2), __ATOMIC_ACQUIRE);
	return producer > consumer ? producer - consumer : 0;
}

uint64_t tapio_rings_wakeups(const tapio_rings *rings)
{
	return rings ? __atomic_load_n(&rings->wakeups, __ATOMIC_RELAXED) : 0;
}

void tapio_rings_free(tapio_rings *rings)
{
	if (!rings)
		return;
	for (int i = 0; i < rings->count; i++)
		if (rings->rings[i].positions)
			munmap(rings->rings[i].positions, rings->rings[i].positions_len);
	ring_buffer__free(rings->reader);
	free(rings);
}
