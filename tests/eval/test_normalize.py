"""The English text normaliser."""
import random

import pytest

from omnitalk.eval.normalize import EnglishTextNormalizer, digits_to_words, normalize, number_to_words, words_to_digits


@pytest.mark.parametrize("text, want", [
    ("Hello, World!", "hello world"),
    ("I won't go; it's Mr. Smith's colour.", "i will not go it is mister smiths color"),
    ("They're here and we'll see, you've got it, I'd say I'm ok", "they are here and we will see you have got it i "
                                                                  "would say i am okay"),
    ("[noise] Uh, so (laughs) <unk> um the cat", "so the cat"),
    ("HE HAD TWENTY-ONE DOGS.", "he had 21 dogs"),
    ("three hundred and five", "305"),
    ("one two three", "1 2 3"),
    ("in nineteen ninety nine", "in 1999"),
    ("twenty first of may", "21st of may"),
    ("three point five percent", "3.5 percent"),
    ("3.5%", "3.5 percent"),
    ("1,000,000 people", "1000000 people"),
    ("I'm gonna wanna", "i am going to want to"),
    ("  many   spaces\there \n", "many spaces here"),
    ("The centre's grey", "the centers gray"),
    ("rock & roll", "rock and roll"),
    ("", ""),
])
def test_examples(text, want):
    assert normalize(text) == want


def test_both_spellings_of_a_number_agree():
    for a, b in (("Seven.", "7"), ("what is three plus four", "What is 3 plus 4?"), ("a hundred", "100"),
                 ("two thousand and twenty four", "2024"), ("one million two hundred thousand", "1,200,000")):
        assert normalize(a) == normalize(b), (a, b)


def test_numbers_roundtrip():
    for n in list(range(0, 1001)) + random.Random(0).sample(range(1001, 10**9), 500):
        assert words_to_digits(number_to_words(n)) == str(n)
    assert [number_to_words(n) for n in (0, 13, 40, 42, 100, 101)] == \
        ["zero", "thirteen", "forty", "forty two", "one hundred", "one hundred one"]
    assert digits_to_words("i have 21 cats and 3.5 dogs") == "i have twenty one cats and three point five dogs"


def test_options():
    assert EnglishTextNormalizer(numbers="words")("I have 21 cats") == "i have twenty one cats"
    assert EnglishTextNormalizer(numbers=None)("twenty one") == "twenty one"
    assert EnglishTextNormalizer(remove_fillers=False)("uh yes") == "uh yes"
    assert EnglishTextNormalizer(spellings=False)("colour") == "colour"
    with pytest.raises(ValueError):
        EnglishTextNormalizer(numbers="roman")
