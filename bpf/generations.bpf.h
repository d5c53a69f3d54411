/* Double-buffered aggregation, shared by bpf/net.bpf.c and bpf/io.bpf.c.
 *
 * Every aggregation map exists twice, one per generation: programs fold into
 * the active generation while the loader empties the other, which nothing
 * writes any more (Sources/CTapioBPF/generations.c is the loader's side).
 * Include after common.bpf.h.
 */
#ifndef TAPIO_GENERATIONS_BPF_H
#define TAPIO_GENERATIONS_BPF_H

/* The generation the programs write into (0 or 1), and per generation the
 * programs that are using it right now. Written and read by the loader
 * through the mmapped .bss; apart on their own cache lines so the counters'
 * traffic does not evict the flag every program reads. */
__u32 agg_gen __attribute__((aligned(64)));
__u64 agg_busy[2] __attribute__((aligned(64)));

/* Enters the active generation for one event: counts this program in
 * agg_busy of the generation it read from agg_gen, then reads agg_gen again.
 * The loader does the mirror image: it stores the new agg_gen, then waits for
 * agg_busy of the old one to reach 0 before it empties the old maps. Both
 * sides put a full barrier between their store and their load (a fetching
 * BPF atomic here, a seq_cst store and load there), so they cannot both miss
 * each other: either the loader sees this program's count and waits for it,
 * or this program sees the new agg_gen and moves over to it. The generation
 * returned is therefore never emptied while the event is being added.
 * Moving again only happens if the loader flips twice within one event (two
 * harvests); after a few tries the event is counted as lost, never silent.
 * NULL when lost (counted). */
static __always_inline __u64 *tapio_gen_enter(__u32 *gen, __u32 kind)
{
	__u32 g = *(volatile __u32 *)&agg_gen & 1;
	__u32 now;
	__u64 *busy, prev;
	int i;

	for (i = 0; i < 4; i++) {
		busy = g ? &agg_busy[1] : &agg_busy[0];
		/* The fetching form is fully ordered on every JIT; its result
		 * is kept so the compiler cannot use the plain add. */
		prev = __sync_fetch_and_add(busy, 1);
		asm volatile("" : : "r"(prev) : "memory");
		now = *(volatile __u32 *)&agg_gen & 1;
		if (now == g) {
			*gen = g;
			return busy;
		}
		prev = __sync_fetch_and_sub(busy, 1);
		asm volatile("" : : "r"(prev) : "memory");
		g = now;
	}
	tapio_count_drop(kind, TAPIO_DROP_MAP_FULL);
	return NULL;
}

/* Leaves the generation: every update of its maps is visible before the
 * loader can see the count drop (fully ordered atomic). */
static __always_inline void tapio_gen_exit(__u64 *busy)
{
	__u64 prev = __sync_fetch_and_sub(busy, 1);

	asm volatile("" : : "r"(prev) : "memory");
}

#endif
