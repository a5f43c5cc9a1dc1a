"""Hashed character n-grams exactly as scikit-learn's HashingVectorizer(analyzer="char_wb") counts them, with each
word's columns cached.

The firewall hashes every question's character 3-5-grams inside words. scikit-learn builds every n-gram string and
hashes it again for each text: about 1.5 ms of a long prompt, the largest part of the firewall's time. Words repeat
across questions, so `WordCharNgrams` keeps each word's hashed columns in a bounded LRU cache and only builds the
sparse row per text: about a quarter of the time. The matrix is the same, value for value (a test compares it with
HashingVectorizer on every eval prompt and on Unicode edge cases).

The cache holds words of recent questions in this process's memory only (never written anywhere, never logged),
at most CACHE_WORDS of them, each at most MAX_CACHED_WORD characters long: a longer word (a run of symbols, a pasted
key) is hashed each time rather than kept, so hostile questions full of long distinct words cannot grow the cache
(about 9,000 columns for one 3,000-character word: up to gigabytes over CACHE_WORDS entries) beyond about 20 MiB.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import sparse
from sklearn.utils import murmurhash3_32
from sklearn.utils.sparsefuncs_fast import inplace_csr_row_normalize_l2

CACHE_WORDS = 2**15  # each word's columns are kept as packed int32 bytes
MAX_CACHED_WORD = 32  # characters: an entry holds at most 93 columns (4 bytes each) besides its word
_MOST_NEGATIVE = -(2**31)


def l2_normalised(matrix: sparse.csr_matrix) -> sparse.csr_matrix:
    """`sklearn.preprocessing.normalize(matrix, norm="l2", copy=False)` of a float CSR matrix, the same values (it
    calls the same routine) without its input checks: a few tenths of a millisecond a question."""
    inplace_csr_row_normalize_l2(matrix)
    return matrix


class WordCharNgrams:
    """The output of `HashingVectorizer(analyzer="char_wb", ngram_range=ngram_range, n_features=n_features,
    alternate_sign=False, norm="l2", lowercase=True, dtype=np.float32)`."""

    def __init__(self, ngram_range: tuple[int, int], n_features: int) -> None:
        self.ngram_range, self.n_features = ngram_range, n_features
        self._word_columns = functools.lru_cache(maxsize=CACHE_WORDS)(self._columns_of_word)

    def transform(self, texts: list[str]) -> sparse.csr_matrix:
        """One L2-normalised float32 row of n-gram counts per text."""
        if not texts:
            return sparse.csr_matrix((0, self.n_features), dtype=np.float32)
        indptr, indices, counts = [0], [], []
        for text in texts:
            # HashingVectorizer collapses runs of `\s` first; str.split() splits on the same characters anyway
            packed = b"".join(self._packed_columns(word) for word in text.lower().split())
            unique, count = np.unique(np.frombuffer(packed, dtype=np.int32), return_counts=True)
            indices.append(unique)
            counts.append(count.astype(np.float32))
            indptr.append(indptr[-1] + len(unique))
        matrix = sparse.csr_matrix((np.concatenate(counts), np.concatenate(indices), np.asarray(indptr)),
                                   shape=(len(texts), self.n_features), dtype=np.float32)
        return l2_normalised(matrix)

    def _packed_columns(self, word: str) -> bytes:
        """The columns of a word's n-grams: from the cache, or hashed afresh for a word too long to keep."""
        return self._word_columns(word) if len(word) <= MAX_CACHED_WORD else self._columns_of_word(word)

    def _columns_of_word(self, word: str) -> bytes:
        """The columns of a word's n-grams (packed int32), padded with a space each side; a word shorter than n
        counts once."""
        padded, (low, high) = f" {word} ", self.ngram_range
        columns = []
        for n in range(low, high + 1):
            columns.extend(self._column(padded[offset:offset + n]) for offset in range(max(len(padded) - n, 0) + 1))
            if len(padded) <= n:
                break
        return np.asarray(columns, dtype=np.int32).tobytes()

    def _column(self, ngram: str) -> int:
        """FeatureHasher's column: signed 32-bit murmurhash3 of the UTF-8 bytes, seed 0, |h| mod n_features."""
        h = murmurhash3_32(ngram, seed=0, positive=False)
        magnitude = 2**31 - 1 - (self.n_features - 1) if h == _MOST_NEGATIVE else abs(h)  # FeatureHasher's rule
        return magnitude % self.n_features
