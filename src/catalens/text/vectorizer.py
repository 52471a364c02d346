"""TF-IDF features of product titles: word and character n-grams, saved as plain JSON.

The vocabulary and inverse document frequencies are learnt with scikit-learn's
``TfidfVectorizer``; at prediction time the counts come from a ``CountVectorizer`` given
that fixed vocabulary (public API) and the weighting (sublinear tf, idf, l2 norm) is done
here, so a saved model needs no pickle and reproduces ``TfidfVectorizer.transform``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer


def clean_titles(texts) -> tuple[list[str], np.ndarray]:
    """Titles as strings ('' where absent) and the mask of rows that have a title.

    ``None``, NaN, non-strings and blank strings count as "no title".
    """
    out, has = [], []
    for t in texts:
        ok = isinstance(t, str) and bool(t.strip())
        out.append(t if ok else "")
        has.append(ok)
    return out, np.asarray(has, dtype=bool)


class _Analyzer:
    """One n-gram analyzer (``word`` or ``char_wb``) with its vocabulary and idf."""

    def __init__(self, analyzer: str, ngram: tuple[int, int], max_features: int | None, min_df: int,
                 use_idf: bool, sublinear_tf: bool) -> None:
        self.analyzer = analyzer
        self.ngram = (int(ngram[0]), int(ngram[1]))
        self.max_features = max_features
        self.min_df = min_df
        self.use_idf = use_idf
        self.sublinear_tf = sublinear_tf
        self.vocabulary: dict[str, int] = {}
        self.idf: np.ndarray | None = None
        self._counter: tuple[dict, CountVectorizer] | None = None  # (the vocabulary, its vectorizer)

    def _kw(self) -> dict:
        # the word pattern keeps one-letter tokens and hyphenated words ("t-shirt")
        kw = dict(analyzer=self.analyzer, ngram_range=self.ngram, lowercase=True, dtype=np.float64)
        if self.analyzer == "word":
            kw["token_pattern"] = r"(?u)\b\w[\w\-]*\b"
        return kw

    def fit(self, texts: list[str]) -> "_Analyzer":
        v = TfidfVectorizer(max_features=self.max_features, min_df=self.min_df, use_idf=self.use_idf,
                            sublinear_tf=self.sublinear_tf, norm=None, **self._kw())
        try:
            v.fit(texts)
        except ValueError:  # empty vocabulary (no titles at all)
            self.vocabulary, self.idf = {}, np.zeros(0)
            return self
        self.vocabulary = {str(k): int(i) for k, i in v.vocabulary_.items()}
        self.idf = np.asarray(v.idf_, dtype=np.float64) if self.use_idf else np.ones(len(self.vocabulary))
        return self

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        """Weighted (not yet normalised) counts ``(n, |vocabulary|)``."""
        if not self.vocabulary:
            return sp.csr_matrix((len(texts), 0))
        X = self._count_vectorizer().transform(texts).tocsr().astype(np.float64)
        if self.sublinear_tf:
            X.data = 1.0 + np.log(X.data)
        X.data *= self.idf[X.indices]
        return X

    def _count_vectorizer(self) -> CountVectorizer:
        """One counting vectorizer per vocabulary: built (and its vocabulary checked) once, not per
        call; a served title then costs ~1 ms instead of ~13 (docs/serving.md)."""
        if self._counter is None or self._counter[0] is not self.vocabulary:
            cv = CountVectorizer(vocabulary=self.vocabulary, **self._kw())
            cv.transform([""])  # validates the vocabulary now
            self._counter = (self.vocabulary, cv)
        return self._counter[1]

    def to_dict(self) -> dict:
        return {"analyzer": self.analyzer, "ngram": list(self.ngram), "max_features": self.max_features,
                "min_df": self.min_df, "use_idf": self.use_idf, "sublinear_tf": self.sublinear_tf,
                "vocabulary": self.vocabulary, "idf": [float(x) for x in (self.idf if self.idf is not None else [])]}

    @classmethod
    def from_dict(cls, d: dict) -> "_Analyzer":
        a = cls(d["analyzer"], tuple(d["ngram"]), d["max_features"], d["min_df"], d["use_idf"], d["sublinear_tf"])
        a.vocabulary = {str(k): int(v) for k, v in d["vocabulary"].items()}
        a.idf = np.asarray(d["idf"], dtype=np.float64)
        return a


class TitleVectorizer:
    """Word n-grams + character n-grams (within word boundaries), concatenated.

    ``norm='l2'`` normalises each block separately, so words and characters weigh the same.
    The Naive Bayes baseline uses plain word counts: ``TitleVectorizer(char_ngram=None,
    use_idf=False, sublinear_tf=False, norm=None)``.
    """

    def __init__(self, ngram: tuple[int, int] | None = (1, 2), char_ngram: tuple[int, int] | None = (2, 5),
                 max_features: int | None = 50_000, min_df: int = 1, use_idf: bool = True,
                 sublinear_tf: bool = True, norm: str | None = "l2") -> None:
        if ngram is None and char_ngram is None:
            raise ValueError("a title vectorizer needs word n-grams, character n-grams or both")
        self.norm = norm
        self.parts: list[_Analyzer] = []
        if ngram is not None:
            self.parts.append(_Analyzer("word", ngram, max_features, min_df, use_idf, sublinear_tf))
        if char_ngram is not None:
            self.parts.append(_Analyzer("char_wb", char_ngram, max_features, min_df, use_idf, sublinear_tf))

    @property
    def n_features(self) -> int:
        return sum(len(p.vocabulary) for p in self.parts)

    def fit(self, texts) -> "TitleVectorizer":
        titles, has = clean_titles(texts)
        kept = [t for t, h in zip(titles, has) if h]
        for p in self.parts:
            p.fit(kept)
        return self

    def transform(self, texts) -> sp.csr_matrix:
        """``(n, n_features)`` sparse; a row without a title is all zeros."""
        titles, _ = clean_titles(texts)
        blocks = []
        for p in self.parts:
            X = p.transform(titles)
            if self.norm == "l2":
                norms = np.sqrt(np.asarray(X.multiply(X).sum(1)).ravel())
                X = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ X
            blocks.append(X)
        return sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix((len(titles), 0))

    def fit_transform(self, texts) -> sp.csr_matrix:
        return self.fit(texts).transform(texts)

    def to_dict(self) -> dict:
        return {"norm": self.norm, "parts": [p.to_dict() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> "TitleVectorizer":
        v = cls.__new__(cls)
        v.norm = d["norm"]
        v.parts = [_Analyzer.from_dict(p) for p in d["parts"]]
        return v

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "TitleVectorizer":
        return cls.from_dict(json.loads(Path(path).read_text()))
