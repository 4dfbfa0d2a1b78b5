"""Children's stories from a small grammar, in the spirit of TinyStories.

A story has a hero (name, kind, pronouns), a friend, a place, an object with a
color, the weather and one of eight plots (a lost object, a new friend, sharing,
trying again, a storm, a gift, honesty, helping an animal). Each plot is a
sequence of beats; each beat has several wordings, some with dialog. Names,
pronouns, the object and the place stay consistent through the story, so a
small model has real structure to learn: who did what, where, and with what.

``generate_story(rng)`` returns ``(text, slots)``; the slots let other
generators ask questions about the story (see ``synthetic/sft.py``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = {  # pronoun -> names, so a name always goes with the same pronoun
    "she": ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Rosie", "Daisy", "Ruby", "Nina",
            "Bella", "Ivy", "Ella", "Grace"],
    "he": ["Tom", "Max", "Ben", "Tim", "Sam", "Jack", "Leo", "Ollie", "Finn", "Milo", "Kai", "Pip",
           "Jake", "Noah", "Luke"],
}
ALL_NAMES = NAMES["she"] + NAMES["he"]
KINDS = {  # kind -> fixed pronoun, or None when either fits
    "girl": "she", "boy": "he", "dog": None, "cat": None, "bunny": None, "bear": None,
    "bird": None, "mouse": None, "fox": None, "duck": None, "frog": None, "owl": None,
    "puppy": None, "kitten": None, "dragon": None, "robot": None,
}
ADJECTIVES = ["little", "kind", "brave", "curious", "shy", "happy", "clever", "silly", "tiny",
              "friendly", "gentle", "busy"]
PLACES = {  # place -> a sentence that sets the scene
    "park": "The grass was green and the swings moved in the wind.",
    "forest": "Tall trees stood all around and leaves fell softly.",
    "beach": "The waves came in and out, and the sand was warm.",
    "garden": "Red and yellow flowers grew next to the path.",
    "farm": "A cow said moo and a pig rolled in the mud.",
    "school": "Children laughed and played in the big yard.",
    "lake": "Ducks swam on the water and the sun made it shine.",
    "hill": "From the top, you could see the whole town.",
    "library": "There were so many books on the high shelves.",
    "zoo": "A lion yawned and a monkey jumped from tree to tree.",
    "meadow": "Butterflies flew over the soft green grass.",
    "river": "The water went splash over the round stones.",
}
OBJECTS = ["ball", "kite", "teddy bear", "book", "hat", "toy car", "stone", "cup", "drum", "boat",
           "flower", "key", "box", "shell", "balloon", "doll", "train", "blanket"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "shiny", "big"]
HIDING = ["under a bush", "behind a big tree", "next to a rock", "under the bench",
          "inside an old box", "behind the door", "in the tall grass", "under a pile of leaves"]
ACTIVITIES = [  # (wish, failure, success)
    ("climb the big tree", "slipped and fell on the soft grass", "reached the top branch"),
    ("fly a kite", "watched the kite fall down again and again", "saw the kite fly up high"),
    ("ride a bike", "wobbled and fell over", "rode all the way to the gate"),
    ("build a sand castle", "saw the castle fall down", "built a tall castle with a flag"),
    ("jump over the puddle", "landed right in the water", "jumped over it with a big smile"),
    ("swim across the pond", "got tired and had to stop", "swam all the way across"),
]
GIFTS = [("drew a picture of", "picture"), ("baked a small cake for", "cake"),
         ("made a flower crown for", "flower crown"), ("made a card for", "card")]
HURT_ANIMALS = ["bird", "kitten", "puppy", "bunny", "duck"]
WEATHER = ["sunny", "windy", "cloudy", "warm", "cold"]
PLOTS = ["lost", "friend", "share", "try", "storm", "gift", "honest", "help"]
PLOT_SUMMARY = {
    "lost": "loses {his} {obj} and finds it with the help of a friend",
    "friend": "makes a new friend",
    "share": "learns to share {his} {obj}",
    "try": "does not give up",
    "storm": "is scared of a storm",
    "gift": "makes a gift for {his} mom",
    "honest": "breaks something and tells the truth",
    "help": "helps a hurt animal",
}


@dataclass
class Character:
    name: str
    kind: str
    he: str  # "he" or "she"
    adj: str

    @property
    def his(self) -> str:
        return "his" if self.he == "he" else "her"

    @property
    def him(self) -> str:
        return "him" if self.he == "he" else "her"


def make_character(rng: random.Random, name: str | None = None, kind: str | None = None) -> Character:
    """A character; a given name fixes the pronoun, a given girl/boy kind fixes it too."""
    if name is not None:
        he = "she" if name in NAMES["she"] else "he"
        kind = kind or rng.choice([k for k, p in KINDS.items() if p in (None, he)])
    else:
        kind = kind or rng.choice(list(KINDS))
        he = KINDS.get(kind) or rng.choice(["he", "she"])
        name = rng.choice(NAMES[he])
    return Character(name, kind, he, rng.choice(ADJECTIVES))


def _fill(rng: random.Random, options: list[str], ctx: dict) -> str:
    """Pick one wording and fill its slots; capitalize the first letter."""
    s = rng.choice(options).format(**ctx)
    return s[0].upper() + s[1:]


def _context(hero: Character, friend: Character, place: str, obj: str, color: str) -> dict:
    return {
        "name": hero.name, "kind": hero.kind, "adj": hero.adj, "he": hero.he, "his": hero.his,
        "him": hero.him, "friend": friend.name, "fkind": friend.kind, "fhe": friend.he,
        "fhis": friend.his, "fhim": friend.him, "place": place, "obj": obj, "color": color,
    }


def _plot_beats(plot: str, rng: random.Random, c: dict) -> list[list[str]]:
    """The beats of one plot, each a list of alternative wordings."""
    if plot == "lost":
        spot = rng.choice(HIDING)
        return [
            ["{name} played with {his} {color} {obj} at the {place} all morning.",
             "{name} took {his} {color} {obj} to the {place}. It was {his} favorite thing."],
            ["Then {name} looked down. The {obj} was gone!", "After a while, {name} could not find the {obj}."],
            ['"Oh no! Where is my {obj}?" {name} cried.', "{name} felt sad and began to cry."],
            ["{friend} the {fkind} saw {him} and came over. \"Don't be sad. I will help you look,\" {fhe} said.",
             "{friend} the {fkind} heard {him}. \"Let's look together,\" said {friend}."],
            [f"They looked everywhere. At last, {{friend}} found the {{obj}} {spot}.",
             f"They searched and searched. Then {{name}} saw something {{color}} {spot}. It was the {{obj}}!"],
            ['"Thank you, {friend}!" said {name}. {He} hugged {his} friend.',
             "{name} was so happy. {He} said thank you to {friend}."],
            ["From that day on, {name} and {friend} were best friends.", "Friends help each other when things go wrong."],
        ]
    if plot == "friend":
        game = rng.choice(["tag", "hide and seek", "catch", "a game with a ball", "jump rope"])
        return [
            ["{name} went to the {place}, but {he} had no one to play with.",
             "At the {place}, {name} sat alone. {He} felt a little lonely."],
            ["Then {name} saw a {fkind} named {friend}. {friend} looked lonely too.",
             "A {fkind} named {friend} was sitting under a tree nearby."],
            ['{name} was shy, but {he} said, "Hello! Do you want to play with me?"',
             '"Hi, I am {name}," said {name} in a small voice. "Can I play with you?"'],
            ['{friend} smiled. "Yes, I would like that!" {fhe} said.', '"Of course!" said {friend} with a big smile.'],
            [f"They played {game} until the sun went down.", f"The two of them played {game} and laughed a lot."],
            ["{name} was not lonely anymore. {He} had a new friend.",
             "When it was time to go home, {name} and {friend} said they would meet again the next day."],
        ]
    if plot == "share":
        return [
            ["{name} had a {color} {obj}. {He} loved it very much.", "{name} got a new {color} {obj} from {his} grandma."],
            ["{He} took the {obj} to the {place} to play.", "One day, {name} played with the {obj} at the {place}."],
            ['{friend} the {fkind} saw the {obj}. "Can I play with it too?" {fhe} asked.',
             '{friend} came over and asked, "May I have a turn with your {obj}?"'],
            ['"No, it is mine!" said {name}. {friend} looked sad and walked away.',
             "{name} held the {obj} close and said no. {friend} felt sad."],
            ["{name} did not feel happy. Playing alone was not fun.",
             "Soon {name} felt bad. {He} did not like to see {his} friend sad."],
            ['{name} ran to {friend}. "I am sorry. Let\'s play with the {obj} together," {he} said.',
             '{name} gave the {obj} to {friend}. "You can have a turn," {he} said.'],
            ["They played together and had lots of fun. Sharing made them both happy.",
             "{friend} smiled, and they played all day. {name} learned that sharing is good."],
        ]
    if plot == "try":
        wish, fail, win = rng.choice(ACTIVITIES)
        return [
            [f"{{name}} wanted to {wish} at the {{place}}.", f"One day at the {{place}}, {{name}} decided to {wish}."],
            [f"{{He}} tried, but {{he}} {fail}.", f"The first time, {{name}} {fail}."],
            ['"I can\'t do it," {name} said. {He} felt sad.', "{name} wanted to give up."],
            ['{friend} the {fkind} said, "Try again. You can do it!"',
             '{his} mom smiled and said, "Everyone falls at first. Try one more time."'],
            [f"So {{name}} tried again, and again. At last, {{he}} {win}!",
             f"{{name}} took a deep breath and tried once more. This time {{he}} {win}."],
            ["{name} felt very proud. {He} learned to never give up.",
             '"I did it!" shouted {name}. {He} was so proud of {him}self.'],
        ]
    if plot == "storm":
        return [
            ["{name} was playing at the {place} when the sky turned dark.",
             "One afternoon, big gray clouds came over the {place}."],
            ["Then there was a loud boom of thunder. Rain began to fall.", "Boom! The thunder was very loud, and the rain came down."],
            ['{name} was scared. "I don\'t like the storm," {he} said.', "{name} felt scared and hid under {his} {color} blanket."],
            ['{his} dad sat next to {him}. "The storm is just loud. We are safe inside," he said.',
             '{his} mom gave {him} a hug. "Thunder is only noise. It will go away soon," she said.'],
            ["They drank warm milk and read a book together.", "They listened to the rain and counted the seconds after each boom."],
            ["Soon the storm was over and the sun came out. {name} was not scared anymore.",
             "After a while, the rain stopped. {name} saw a rainbow and smiled."],
        ]
    if plot == "gift":
        verb, gift = rng.choice(GIFTS)
        return [
            ["It was {his} mom's birthday, and {name} wanted to make her happy.",
             "{name} wanted to give {his} mom a special surprise."],
            [f"{{He}} {verb} her. It took a long time.", f"So {{name}} {verb} {{his}} mom all by {{him}}self."],
            [f"{{friend}} the {{fkind}} helped a little, and the {gift} looked very nice.",
             f"The {gift} was not perfect, but {{name}} made it with love."],
            [f'When mom came home, {{name}} said, "Surprise! This {gift} is for you!"',
             f'{{name}} gave mom the {gift}. "Happy birthday, mom!" {{he}} said.'],
            ['Mom was very surprised. "Thank you! I love it," she said.', "Mom smiled and gave {name} a big hug."],
            ["{name} felt warm and happy inside. Giving a gift can feel even better than getting one."],
        ]
    if plot == "honest":
        return [
            ["{name} was playing with a {color} {obj} inside the house.", "{name} threw {his} {color} {obj} up in the air in the kitchen."],
            ["Crash! The {obj} hit mom's favorite vase, and it broke.", "Oops! The {obj} knocked a cup off the table. It broke into pieces."],
            ["{name} felt worried. {He} wanted to hide.", "{name} was scared that mom would be angry."],
            ['But {name} went to mom and said, "I am sorry. I broke it."',
             '{name} took a deep breath. "Mom, it was me. I was playing inside," {he} said.'],
            ['Mom said, "Thank you for telling the truth. We can fix it together."',
             'Mom hugged {him}. "I am glad you were honest with me," she said.'],
            ["{name} felt much better. It is always best to tell the truth.",
             "From then on, {name} played with the {obj} outside at the {place}."],
        ]
    animal = rng.choice(HURT_ANIMALS)
    return [  # plot == "help"
        [f"{{name}} was walking at the {{place}} when {{he}} saw a little {animal}.",
         f"At the {{place}}, {{name}} heard a soft sound. It was a small {animal}."],
        [f"The {animal} had a hurt leg and could not move.", f"The {animal} was hurt and looked scared."],
        [f'"Poor little {animal}," said {{name}}. "I will help you."', f"{{name}} wanted to help the {animal}."],
        [f"{{He}} carried the {animal} home in {{his}} {{color}} {{obj}}, and {{friend}} the {{fkind}} brought some water.",
         f"{{name}} and {{friend}} gave the {animal} food and a warm bed."],
        [f"After a few days, the {animal} was strong again.", f"Every day the {animal} got a little better."],
        [f"The {animal} was happy and went back to the {{place}}. {{name}} waved goodbye.",
         "{name} felt proud. Helping others made {him} feel happy."],
    ]


def generate_story(rng: random.Random, *, name: str | None = None, kind: str | None = None,
                   place: str | None = None, obj: str | None = None, plot: str | None = None,
                   short: bool = False) -> tuple[str, dict]:
    """Generate one story.

    Args: rng seeds every choice; keyword slots (name, kind, place, obj, plot)
    fix parts of the story. ``short=True`` drops the scene and ending extras
    (about 80 words instead of about 150).
    Returns: (text, slots) where slots = {name, kind, he, friend, fkind, place,
    obj, color, plot, weather}.
    """
    hero = make_character(rng, name, kind)
    friend = make_character(rng)
    while friend.name == hero.name:
        friend = make_character(rng)
    place = place or rng.choice(list(PLACES))
    obj = obj or rng.choice(OBJECTS)
    plot = plot or rng.choice(PLOTS)
    color, weather = rng.choice(COLORS), rng.choice(WEATHER)
    ctx = _context(hero, friend, place, obj, color)
    ctx["He"] = hero.he.capitalize()

    opening = _fill(rng, [
        "Once upon a time, there was a {adj} {kind} named {name}.",
        "There once was a {adj} {kind} called {name}.",
        "{name} was a {adj} {kind} who lived near the {place}.",
        "Once upon a time, in a small town, lived a {adj} {kind} named {name}.",
    ], ctx)
    first = [opening]
    if not short:
        first.append(_fill(rng, [f"It was a {weather} day.", f"The day was {weather}, and {{name}} felt happy.",
                                 f"One {weather} morning, {{name}} woke up early."], ctx))
        if plot not in ("gift", "honest"):
            first.append(PLACES[place])
    beats = _plot_beats(plot, rng, ctx)
    if short:
        beats = beats[:2] + beats[-3:]
    sentences = [_fill(rng, options, ctx) for options in beats]
    # Paragraphs: opening, then the plot in two halves (reads like TinyStories).
    half = (len(sentences) + 1) // 2
    text = "\n\n".join([" ".join(first), " ".join(sentences[:half]), " ".join(sentences[half:])])
    if not short and rng.random() < 0.3:
        text += "\n\n" + _fill(rng, ["The end.", "And they all lived happily ever after.",
                                     "{name} would always remember that day."], ctx)
    slots = {"name": hero.name, "kind": hero.kind, "he": hero.he, "friend": friend.name,
             "fkind": friend.kind, "place": place, "obj": obj, "color": color, "plot": plot,
             "weather": weather}
    return text, slots


def plot_summary(slots: dict) -> str:
    """A short phrase for the plot, e.g. 'learns to share her ball'."""
    his = "his" if slots["he"] == "he" else "her"
    return PLOT_SUMMARY[slots["plot"]].format(his=his, obj=slots["obj"])
