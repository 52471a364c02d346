"""Product titles: TF-IDF + linear title models, a Naive Bayes baseline, image + title fusion."""
from catalens.text.fusion import TextFusion, fit_text_fusion, fit_weights
from catalens.text.model import TitleModel
from catalens.text.vectorizer import TitleVectorizer, clean_titles

__all__ = ["TextFusion", "TitleModel", "TitleVectorizer", "clean_titles", "fit_text_fusion", "fit_weights"]
