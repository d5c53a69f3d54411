#include "tapio_zstd.h"

#include <stdlib.h>
#include <zstd.h>

struct tapio_zstd_ctx {
	ZSTD_CCtx *cctx;
};

tapio_zstd_ctx *tapio_zstd_ctx_new(int level)
{
	tapio_zstd_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return NULL;
	ctx->cctx = ZSTD_createCCtx();
	if (!ctx->cctx || ZSTD_isError(ZSTD_CCtx_setParameter(ctx->cctx, ZSTD_c_compressionLevel, level)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(ctx->cctx, ZSTD_c_checksumFlag, 1))) {
		tapio_zstd_ctx_free(ctx);
		return NULL;
	}
	return ctx;
}

void tapio_zstd_ctx_free(tapio_zstd_ctx *ctx)
{
	if (!ctx)
		return;
	ZSTD_freeCCtx(ctx->cctx);
	free(ctx);
}

size_t tapio_zstd_bound(size_t length)
{
	return ZSTD_compressBound(length);
}

int64_t tapio_zstd_compress(tapio_zstd_ctx *ctx, void *dst, size_t capacity, const void *src, size_t length,
			    const char **error)
{
	size_t n = ZSTD_compress2(ctx->cctx, dst, capacity, src, length);
	if (ZSTD_isError(n)) {
		if (error)
			*error = ZSTD_getErrorName(n);
		return -1;
	}
	return (int64_t)n;
}

int64_t tapio_zstd_frame_size(const void *src, size_t length)
{
	unsigned long long n = ZSTD_getFrameContentSize(src, length);
	if (n == ZSTD_CONTENTSIZE_UNKNOWN || n == ZSTD_CONTENTSIZE_ERROR || n > INT64_MAX)
		return -1;
	return (int64_t)n;
}

int64_t tapio_zstd_decompress(void *dst, size_t capacity, const void *src, size_t length, const char **error)
{
	size_t n = ZSTD_decompress(dst, capacity, src, length);
	if (ZSTD_isError(n)) {
		if (error)
			*error = ZSTD_getErrorName(n);
		return -1;
	}
	return (int64_t)n;
}
