"""
The quick start's corpus: short children's stories from a small generated grammar, tokenized into shards by
download-fineweb-edu.py. train.py --preset quickstart calls prepare_quickstart before it trains.
"""

import json
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules

from checkpoint import atomic_write  # noqa: E402
from utils import ROOT, UserError, data_manifest  # noqa: E402


def prepare_quickstart(data_dir):
    """Generated children's stories as a jsonl corpus, tokenized into shards by download-fineweb-edu.py in a process
    of its own: its tokenizer processes and their fork server end with it, not with the training run."""
    if data_manifest(data_dir).get("complete"):  # tokenized by an earlier start
        return
    os.makedirs(data_dir, exist_ok=True)
    corpus = os.path.join(data_dir, "stories.jsonl")
    if not os.path.exists(corpus):
        with atomic_write(corpus, "w") as f:
            f.writelines(json.dumps(dict(text=text)) + "\n" for text in simple_stories(5000))
    args = ["--data-files", corpus, "--out-dir", data_dir, "--prefix", "stories", "--shard-size", "50000"]
    if subprocess.run([sys.executable, os.path.join(ROOT, "download-fineweb-edu.py"), *args]).returncode != 0:
        raise UserError(f"the quick start's stories could not be tokenized into {data_dir} (the error is above)")


def simple_stories(n_stories, seed=0):
    """Short children's stories from a small generated grammar (72 words on average, 49 to 96), the same for a seed.
    On Python's docs a 7M model still wrote word salad after 600k tokens (val loss 5.6); on these it writes
    grammatical sentences, dialogue and the shape of a story in the same few CPU minutes."""
    rng = random.Random(seed)
    # fmt: off
    boys = ["Tom", "Sam", "Ben", "Max", "Tim", "Jack", "Leo", "Dan"]
    girls = ["Lily", "Mia", "Anna", "Lucy", "Sue", "Emma", "Zoe", "Kate"]
    pets = ["dog", "cat", "bird", "rabbit", "duck", "frog", "puppy", "kitten"]
    things = ["ball", "kite", "hat", "book", "boat", "drum", "doll", "train", "teddy bear", "blanket", "apple", "cake"]
    places = ["park", "garden", "forest", "beach", "farm", "river", "yard", "hill", "lake", "town"]
    hides = ["under a tree", "behind a big rock", "in the tall grass", "under the bed", "next to the fence", "in a box"]
    adjectives = ["red", "blue", "green", "yellow", "big", "little", "shiny", "soft", "old", "new", "funny", "pretty"]

    def a_(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    stories = []
    for _ in range(n_stories):
        a, b = rng.sample(boys + girls, 2)
        he, his = ("he", "his") if a in boys else ("she", "her")
        He, His = he.capitalize(), his.capitalize()
        thing, pet, place, place2 = rng.choice(things), rng.choice(pets), *rng.sample(places, 2)
        hide, adjective = rng.choice(hides), rng.choice(adjectives)
        s = [rng.choice([
            f"Once upon a time, there was {a_(rng.choice(['little', 'kind', 'happy', 'curious']))} "
            f"{'boy' if a in boys else 'girl'} named {a}.",
            f"One day, {a} went to the {place} with {his} {pet}.",
            f"{a} had {a_(adjective)} {thing}. {He} loved it very much.",
        ])]
        s.append(rng.choice([f"{He} liked to play in the {place} every day.", f"{His} best friend was {b}.",
                             f"{He} had {a_(adjective)} {thing} and {a_(pet)}."]))
        plot = rng.randrange(4)
        if plot == 0:  # something lost, found with a friend
            s += [f"One day, {a} could not find {his} {thing}.", f"{He} looked everywhere, but it was not there.",
                  f"{a} was sad.", f'Then {b} came and said, "Why are you sad, {a}?"',
                  f'"I lost my {thing}," said {a}.', f'"I will help you," said {b}.',
                  f"They looked and looked. At last, they found the {thing} {hide}.",
                  f'{a} was very happy. "Thank you, {b}!" {he} said.']
        elif plot == 1:  # sharing
            s.append(f'{b} saw the {thing} and said, "Can I play with your {thing}, please?"')
            if rng.random() < 0.5:
                s += [f'"Yes, you can," said {a}.', f"They played with the {thing} together all day.",
                      "They had a lot of fun."]
            else:
                s += [f'"No, it is mine!" said {a}.', f"{b} was sad and went home.",
                      f'Later, {a} felt bad. {He} went to {b} and said, "I am sorry. Let\'s play together."',
                      f"{b} smiled, and they played with the {thing} together."]
        elif plot == 2:  # the pet runs away
            s += [f"One day, the {pet} ran away to the {place2}.", f'{a} ran after it and called, "Come back!"',
                  f"{He} found the {pet} {hide}.", f"The {pet} was scared, so {a} gave it a big hug.",
                  f"Then {a} and the {pet} went home together."]
        else:  # rain
            s += [f"{a} and {b} wanted to go to the {place2}, but it started to rain.", f"{a} was sad.",
                  f'{b} said, "Let\'s play inside!"',
                  f"They made a {rng.choice(['fort', 'tower', 'boat'])} out of boxes and played with the {thing}.",
                  "Soon the sun came out, and they ran outside."]
        s.append(rng.choice(["The end.", f"From that day on, {a} was never sad again.",
                             f"{a} learned that friends help each other.", f"That night, {a} went to bed happy."]))
        stories.append(" ".join(s))
    # fmt: on
    return stories
