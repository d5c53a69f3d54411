/* HMAC-SHA256 on the system OpenSSL (libcrypto): what signs the alert
 * webhook's deliveries (docs/alerts.md). Kept apart from tapio_tls.h, which
 * is about connections and certificates.
 */
#ifndef TAPIO_HMAC_H
#define TAPIO_HMAC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// HMAC-SHA256 of data under key into out (32 bytes). Returns 0, or -1 when
/// OpenSSL fails or the key is longer than OpenSSL takes (INT_MAX bytes).
int tapio_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *data, size_t data_len, uint8_t out[32]);

#ifdef __cplusplus
}
#endif

#endif
