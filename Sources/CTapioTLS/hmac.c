// HMAC-SHA256 for the alert webhook's signature (include/tapio_hmac.h).
#include "tapio_hmac.h"

#include <limits.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

int tapio_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *data, size_t data_len, uint8_t out[32]) {
    if (key_len > INT_MAX) return -1;
    static const uint8_t empty = 0;
    unsigned int len = 0;
    if (HMAC(EVP_sha256(), key_len ? key : &empty, (int)key_len, data_len ? data : &empty, data_len, out, &len) == NULL) return -1;
    return len == 32 ? 0 : -1;
}
