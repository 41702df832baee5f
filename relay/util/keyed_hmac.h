/* The native HMAC of relay/util/keyed_hmac.py (built by keyed_hmac_build.py through cffi):
 * a key's two padded digest states made once, each MAC from copies of them, with no Python
 * object per digest. */
typedef struct kh_key kh_key;

/* The states of `key` under SHA-256 (`sha256` not 0) or SHA-1; NULL if OpenSSL fails. */
kh_key *kh_new(int sha256, const unsigned char *key, size_t key_len);
void kh_free(kh_key *key);
/* The HMAC of `data` into `out` (room for 32 bytes): its length, 0 if OpenSSL fails. */
int kh_digest(const kh_key *key, const unsigned char *data, size_t data_len, unsigned char *out);
