/* HMAC (RFC 2104) with OpenSSL's digests: see keyed_hmac.h and relay/util/keyed_hmac.py. */
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>

#include "keyed_hmac.h"

#define BLOCK 64 /* SHA-1's and SHA-256's block size (RFC 2104's B) */

struct kh_key {
    EVP_MD_CTX *inner; /* the digest after the key XOR ipad */
    EVP_MD_CTX *outer; /* the digest after the key XOR opad */
};

void kh_free(kh_key *key)
{
    if (key == NULL)
        return;
    EVP_MD_CTX_free(key->inner);
    EVP_MD_CTX_free(key->outer);
    free(key);
}

static int start(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *block, unsigned char pad)
{
    unsigned char padded[BLOCK];
    for (int i = 0; i < BLOCK; i++)
        padded[i] = block[i] ^ pad;
    return ctx != NULL && EVP_DigestInit_ex(ctx, md, NULL) && EVP_DigestUpdate(ctx, padded, BLOCK);
}

kh_key *kh_new(int sha256, const unsigned char *key, size_t key_len)
{
    const EVP_MD *md = sha256 ? EVP_sha256() : EVP_sha1();
    unsigned char block[BLOCK] = {0};
    unsigned int hashed;
    /* A key longer than the block is hashed first; a shorter one is padded with zeros. */
    if (key_len > BLOCK) {
        if (!EVP_Digest(key, key_len, block, &hashed, md, NULL))
            return NULL;
    } else if (key_len > 0) {
        memcpy(block, key, key_len);
    }
    kh_key *made = calloc(1, sizeof *made);
    if (made == NULL)
        return NULL;
    made->inner = EVP_MD_CTX_new();
    made->outer = EVP_MD_CTX_new();
    if (!start(made->inner, md, block, 0x36) || !start(made->outer, md, block, 0x5c)) {
        kh_free(made);
        return NULL;
    }
    return made;
}

int kh_digest(const kh_key *key, const unsigned char *data, size_t data_len, unsigned char *out)
{
    unsigned char inner[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    /* A context per call: the states are shared by every thread, and only read. */
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL
        && EVP_MD_CTX_copy_ex(ctx, key->inner) && EVP_DigestUpdate(ctx, data, data_len)
        && EVP_DigestFinal_ex(ctx, inner, &size)
        && EVP_MD_CTX_copy_ex(ctx, key->outer) && EVP_DigestUpdate(ctx, inner, size)
        && EVP_DigestFinal_ex(ctx, out, &size);
    EVP_MD_CTX_free(ctx);
    return ok ? (int)size : 0;
}
