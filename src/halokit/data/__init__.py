"""The data layer: read files, validate rows, convert formats, tokenize with completion masks."""

from halokit.data.convert import convert, feedback_to_pairs, pairs_to_feedback, summarize, write_examples
from halokit.data.examples import (
    FORMATS,
    Example,
    FeedbackExample,
    ForgetExample,
    LabelSpec,
    PreferenceExample,
    SFTExample,
    parse_row,
)
from halokit.data.load import BadRow, Loaded, load_examples, write_bad_rows
from halokit.data.tokenize import Encoded, TokenizeSettings, encode, encode_examples, encode_many

__all__ = [
    "FORMATS", "BadRow", "Encoded", "Example", "FeedbackExample", "ForgetExample", "LabelSpec", "Loaded",
    "PreferenceExample", "SFTExample", "TokenizeSettings", "convert", "encode", "encode_examples",
    "encode_many", "feedback_to_pairs", "load_examples", "pairs_to_feedback", "parse_row", "summarize",
    "write_bad_rows", "write_examples",
]
