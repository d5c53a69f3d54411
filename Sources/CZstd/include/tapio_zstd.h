/* zstd (libzstd-dev) for the server's segment log: one reusable context per
 * writer, frames with a content checksum so that a damaged record fails to
 * decompress instead of decoding as something else. */
#ifndef TAPIO_ZSTD_H
#define TAPIO_ZSTD_H
#include <stddef.h>
#include <stdint.h>

typedef struct tapio_zstd_ctx tapio_zstd_ctx;

/* A compression context at `level` with content checksums; NULL when out of
 * memory. */
tapio_zstd_ctx *tapio_zstd_ctx_new(int level);
void tapio_zstd_ctx_free(tapio_zstd_ctx *ctx);

/* The most a frame of `length` input bytes can take. */
size_t tapio_zstd_bound(size_t length);

/* Compresses src into dst (capacity at least tapio_zstd_bound(length)).
 * Returns the frame's size, or -1 on error (message via *error). */
int64_t tapio_zstd_compress(tapio_zstd_ctx *ctx, void *dst, size_t capacity, const void *src, size_t length,
			    const char **error);

/* The decompressed size a frame declares, -1 when unknown or not a frame. */
int64_t tapio_zstd_frame_size(const void *src, size_t length);

/* Decompresses one frame into dst (exactly `capacity` bytes expected).
 * Returns the decompressed size, or -1 on error (message via *error). */
int64_t tapio_zstd_decompress(void *dst, size_t capacity, const void *src, size_t length, const char **error);
#endif
