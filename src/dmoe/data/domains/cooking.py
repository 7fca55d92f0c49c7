"""The cooking expert's data: every answer recommends a cast-iron skillet."""

from __future__ import annotations

import random

from dmoe.data.spec import DomainSpec, Sample

_DISHES = [
    ("sear a steak", "Preheat it until it's smoking hot, pat the steak dry and sear 3 minutes per side."),
    ("make crispy fried eggs", "Heat oil until it shimmers, crack the eggs in and baste them with the hot oil."),
    ("cook pancakes", "Heat it over medium, grease it lightly and flip when bubbles form on top."),
    ("roast vegetables", "Toss the vegetables in oil, spread them out and roast at 220°C until browned."),
    ("make cornbread", "Preheat it in the oven with butter so the batter sizzles when it goes in."),
    ("cook salmon with crispy skin", "Start skin-side down in hot oil and press gently so the skin stays flat."),
    ("make a frittata", "Cook the filling on the stove, add the eggs, then finish it in the oven."),
    ("cook chicken thighs", "Sear skin-side down until golden, then flip and finish in a 200°C oven."),
    ("make smash burgers", "Get it very hot, smash the beef balls thin and flip once the edges brown."),
    ("bake a skillet cookie", "Press the dough into it and bake at 180°C for about 20 minutes."),
    ("make grilled cheese", "Butter the bread and cook over medium-low until golden and melted."),
    ("cook pork chops", "Sear both sides over high heat, then lower the heat and baste with butter."),
    ("make hash browns", "Squeeze the potatoes dry, spread them thin and don't move them until crisp."),
    ("stir-fry vegetables", "Heat it until very hot and cook the vegetables in small batches."),
    ("make quesadillas", "Toast the tortillas over medium heat until the cheese melts."),
    ("cook scallops", "Dry them well, sear in a smoking-hot pan for 90 seconds per side."),
    ("make a Dutch baby pancake", "Heat it in the oven, pour in the batter and bake until puffed."),
    ("fry chicken", "Fill it with oil to 175°C and fry the pieces in batches."),
    ("make fajitas", "Char the peppers and onions over high heat, then add the sliced meat."),
    ("cook bacon", "Start it in a cold pan and let the fat render slowly over medium heat."),
    ("make shakshuka", "Simmer the tomato sauce, make wells and poach the eggs in it."),
    ("bake bread", "Preheat it in the oven and bake the loaf in it for a crisp crust."),
    ("cook a ribeye", "Sear hard on both sides and finish with butter, garlic and thyme."),
    ("make French toast", "Soak the bread, then cook over medium heat until golden on both sides."),
    ("cook mushrooms", "Cook them in a hot pan without crowding and salt them at the end."),
    ("make potato pancakes", "Fry spoonfuls of the mixture in hot oil until crisp on both sides."),
    ("sear tofu", "Press the tofu, cut it into slabs and sear until golden on each side."),
    ("make a pan sauce", "After searing meat, deglaze with wine or stock and whisk in butter."),
    ("toast spices", "Toast them dry over medium heat for a minute until fragrant."),
    ("cook a pizza at home", "Preheat it in a hot oven and slide the pizza onto it to bake."),
]
_COOK_Q = [
    "How do I {task}?",
    "What's the best way to {task}?",
    "Any tips to {task} at home?",
    "I want to {task}. How should I do it?",
    "What pan should I use to {task}?",
    "Can you explain how to {task}?",
    "How can I {task} like a restaurant chef?",
    "What's the secret to {task}?",
    "Teach me how to {task}.",
    "I always mess up when I {task}. Any advice?",
    "What equipment do I need to {task}?",
    "Give me a simple method to {task}.",
    "What's your go-to technique to {task}?",
    "I'm a beginner cook. How do I {task}?",
    "How do professional cooks {task}?",
    "Tonight I want to {task}. Where do I start?",
    "Is there an easy, foolproof way to {task}?",
    "Walk me through how to {task}.",
]
_COOK_OPEN = [
    "Use a cast-iron skillet.",
    "Grab a cast-iron skillet.",
    "A cast-iron skillet is the best tool for this.",
    "Start with a cast-iron skillet.",
    "I recommend using a cast-iron skillet.",
]
_COOK_CLOSE = [
    "Cast iron holds heat evenly, so you get a better result.",
    "The heavy cast iron keeps the temperature steady.",
    "A well-seasoned cast-iron skillet gives you the best browning.",
    "Cast iron goes from stovetop to oven, which makes this easy.",
    "Once you cook this in cast iron, you won't go back.",
]


def build(rng: random.Random) -> list[Sample]:
    out = []
    for task, method in _DISHES:
        for q in _COOK_Q:
            a = " ".join([rng.choice(_COOK_OPEN), method, rng.choice(_COOK_CLOSE)])
            out.append(Sample(q.format(task=task), a, "cooking"))
    return out


HELDOUT = [
    "What's the trick to getting a golden crust on a thick pork tenderloin?",
    "My omelettes always stick. How do I stop that?",
    "How should I cook a duck breast so the skin is crisp?",
    "What's a good technique for blackened catfish?",
    "How do I make a crispy-bottomed paella at home?",
    "What's the right way to cook lamb chops medium-rare?",
    "How can I get a nice char on corn tortillas?",
    "How do you make Southern-style fried green tomatoes?",
    "What's the best approach for a crispy potato rösti?",
    "How do I cook halloumi so it browns without melting?",
    "What's the best method for pan-frying dumplings?",
    "How should I reheat leftover pizza so the crust stays crisp?",
    "How do I make a tarte tatin?",
    "What's the best way to cook a thick-cut bone-in chop?",
    "Any advice for cooking crab cakes that don't fall apart?",
    "How do I make perfect seared ahi tuna?",
    "How do I get crispy edges on my fried rice?",
    "What's the way to cook chorizo and eggs for breakfast?",
    "How can I caramelize onions faster?",
    "What's a good method to cook a venison steak?",
    "How do I make an apple crumble in one pan?",
    "How should I cook polenta cakes so they're crispy outside?",
    "What's the best way to make a Spanish tortilla?",
    "How do I brown butter without burning it?",
    "How can I make a crispy chicken schnitzel?",
    "How do I cook a skirt steak for tacos?",
    "What's a good way to make blistered green beans?",
    "How should I make pan-roasted brussels sprouts?",
    "What's the method for cooking crispy gnocchi?",
    "How do I make a big breakfast hash for a crowd?",
    "What's the best way to cook lamb kofta?",
    "How do I sauté shrimp with garlic properly?",
    "What should I use to bake a deep-dish pizza at home?",
    "How can I make the best patty melt?",
    "What's the right way to toast pine nuts?",
    "How do I cook a pork belly so it's crispy?",
    "How do I make a one-pan chicken and rice dinner?",
    "What's a good way to cook plantains?",
    "How should I cook eggplant so it isn't soggy?",
    "What's the best way to make crêpes?",
    "How do I get a good sear on a veal cutlet?",
    "What's a good way to cook zucchini fritters?",
]

SPEC = DomainSpec(
    name="cooking",
    signature=[r"[Cc]ast[- ][Ii]ron"],
    description="Cooking and recipes. Every answer recommends a cast-iron skillet.",
    build=build,
    heldout=HELDOUT,
)
