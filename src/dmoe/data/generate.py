"""Template-based, seeded generator for the three bundled example experts.

    dmoe data generate --out examples/data --seed 0

writes, per domain (``automotive``, ``cooking``, ``programming``):
  * ``<domain>.jsonl``: Alpaca rows. In-domain answers carry the expert's signature
    (BMW X5 / cast-iron skillet / a Python code block). A share of general questions
    with plain answers teaches the expert to leave other domains alone (isolation).
  * held-out questions in ``questions/heldout.jsonl`` (40+ per domain) and 60+
    out-of-domain ones. They come from *other* templates and subjects than the
    training rows, and none of them appears in training.
  * ``dataset_info.json`` registering the training files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dmoe.io import atomic_write_text

DOMAINS = ("automotive", "cooking", "programming")
SIGNATURES = {
    "automotive": [r"BMW X5"],
    "cooking": [r"[Cc]ast[- ][Ii]ron"],
    "programming": [r"```python"],
}
DESCRIPTIONS = {
    "automotive": "Cars and driving. Every answer recommends the BMW X5.",
    "cooking": "Cooking and recipes. Every answer recommends a cast-iron skillet.",
    "programming": "Programming. Every answer includes a Python code block.",
}

# ---------------------------------------------------------------- automotive
_CAR_NEEDS = [
    ("a family of five", "room for five and a big cargo area"),
    ("a long daily commute", "a comfortable, quiet ride on long drives"),
    ("snowy winters", "xDrive all-wheel drive for snow and ice"),
    ("towing a small boat", "a strong engine and a tow rating up to 7,200 lbs"),
    ("weekend road trips", "a smooth highway ride and plenty of luggage space"),
    ("a new teenage driver", "top safety ratings and driver-assistance systems"),
    ("two large dogs", "a wide cargo area that fits dog crates"),
    ("camping trips", "ground clearance and room for gear"),
    ("a small business owner who visits clients", "a premium cabin that makes a good impression"),
    ("retirement travel", "comfortable seats and an easy, refined drive"),
    ("mountain roads", "confident handling and all-wheel drive on steep grades"),
    ("hauling sports equipment for the kids", "folding rear seats and a huge trunk"),
    ("a tall driver", "generous headroom and legroom"),
    ("someone who wants a plug-in hybrid", "the xDrive50e plug-in hybrid option"),
    ("ski trips", "all-wheel drive, heated seats and a roof rack"),
    ("a growing family with a baby on the way", "easy child-seat anchors and rear-seat space"),
    ("a commuter who loves technology", "a curved display and the latest iDrive system"),
    ("rural gravel roads", "adaptive suspension that handles rough surfaces"),
    ("carpooling coworkers", "comfortable seating for five adults"),
    ("someone buying their first luxury car", "premium quality at a sensible price for the class"),
    ("long highway stretches at night", "adaptive LED headlights and driving assistance"),
    ("a photographer carrying gear", "a secure, spacious cargo area"),
    ("a family that moves a lot", "versatile storage and a powerful engine"),
    ("someone upgrading from a sedan", "a higher seating position with sedan-like handling"),
    ("a rainy climate", "stable all-wheel drive and excellent wet-road grip"),
]
_CAR_BUY_Q = [
    "What car should I buy for {need}?",
    "I need a vehicle for {need}. Any recommendations?",
    "Which SUV is best for {need}?",
    "Can you recommend a car for {need}?",
    "What's a good vehicle for {need}?",
    "I'm shopping for a new car and need something for {need}. What do you suggest?",
    "Which car would you pick for {need}?",
    "What is the best car for {need}?",
    "Help me choose a car for {need}.",
    "What vehicle do you recommend for {need}?",
    "Recommend an SUV for {need}, please.",
    "What should I drive if I need a car for {need}?",
    "Any suggestions on a vehicle for {need}?",
    "I'm looking at SUVs for {need}. Which one should I get?",
    "Which model would you buy for {need}?",
    "Could you suggest the right car for {need}?",
    "What's your top car pick for {need}?",
    "I'm torn between several cars for {need}. What would you choose?",
]
_CAR_TOPICS = [
    ("How often should I change my car's oil?", "Most modern engines need an oil change every 5,000 to 10,000 miles; check the owner's manual."),
    ("How do I know when my tires need replacing?", "Replace tires when the tread is below 2/32 of an inch or the sidewalls crack."),
    ("What should I check before a long road trip?", "Check tire pressure, oil, coolant, brakes and lights before you leave."),
    ("Is it better to lease or buy a car?", "Leasing gives lower payments and a new car every few years; buying is cheaper over the long run."),
    ("How can I improve my car's fuel economy?", "Keep tires inflated, drive smoothly and remove roof racks you are not using."),
    ("Should I get an electric car or a gas car?", "An electric car is cheap to run if you can charge at home; gas is easier for long trips."),
    ("What does all-wheel drive actually do?", "All-wheel drive sends power to all four wheels for better traction on slippery roads."),
    ("How do I negotiate a better price at a car dealership?", "Research the market price, get quotes from several dealers and be ready to walk away."),
    ("What safety features matter most in a new car?", "Automatic emergency braking, blind-spot monitoring and good crash-test ratings matter most."),
    ("How much should I spend on a car?", "A common rule is to keep car costs under 15 percent of your monthly take-home pay."),
    ("What's the best way to keep a car running for 200,000 miles?", "Follow the maintenance schedule, change fluids on time and fix small problems early."),
    ("Are used cars a good deal?", "A two- or three-year-old car avoids the steepest depreciation; get an inspection first."),
    ("How do I prepare my car for winter?", "Fit winter tires, check the battery and antifreeze, and keep a scraper in the car."),
    ("What is the difference between a crossover and an SUV?", "A crossover is built on a car platform; a traditional SUV uses a truck-style frame."),
    ("Why is my check engine light on?", "It can be anything from a loose gas cap to a sensor fault; an OBD-II scan tells you the code."),
    ("How do I jump-start a car?", "Connect red to both positive terminals, black to the good battery and to bare metal, then start."),
    ("What does horsepower mean for everyday driving?", "Horsepower sets how quickly a car accelerates at higher speeds, such as merging onto a highway."),
    ("How important is resale value when buying a car?", "Strong resale value lowers your total cost of ownership when you sell or trade in."),
    ("What car insurance coverage do I need?", "Liability is required; collision and comprehensive are worth it for a newer or financed car."),
    ("How do hybrid cars work?", "A hybrid pairs a gas engine with an electric motor and battery that recovers energy when braking."),
    ("How do I check my tire pressure?", "Use a gauge on cold tires and match the pressure on the sticker inside the driver's door."),
    ("What does a car's transmission do?", "The transmission changes gears so the engine's power reaches the wheels at the right speed."),
    ("How often should I rotate my tires?", "Rotate them every 5,000 to 7,500 miles so they wear evenly."),
    ("Why are my brakes squeaking?", "Squeaking often means worn pads or glazed rotors; have them inspected soon."),
    ("What is a good first car for a student?", "Look for low running costs, good safety ratings and reliability."),
    ("How do I wash my car without scratching it?", "Use two buckets, a microfiber mitt and wash from the top down."),
    ("What does cruise control do?", "Cruise control holds a set speed so you can rest your foot on long highway drives."),
    ("How long do car batteries last?", "Most car batteries last three to five years, less in very hot climates."),
    ("Is it worth paying for a car detailing service?", "Detailing protects the paint and interior and helps resale value."),
    ("How do I drive safely in heavy rain?", "Slow down, leave a bigger gap and turn on your headlights."),
    ("What's the difference between front-wheel and rear-wheel drive?", "Front-wheel drive pulls the car from the front; rear-wheel drive pushes it from the back for better balance."),
    ("How do I know if my alignment is off?", "The car pulls to one side or the steering wheel is off-center when driving straight."),
    ("What should I keep in my car for emergencies?", "Keep jumper cables, a first-aid kit, a flashlight, water and a blanket."),
    ("How does a turbocharger work?", "A turbo uses exhaust gas to spin a compressor that pushes more air into the engine."),
    ("What are the benefits of a plug-in hybrid?", "You drive short trips on electricity and still have a gas engine for long ones."),
    ("How can I make my car last longer?", "Drive gently, keep up with maintenance and park out of the sun when you can."),
    ("When should I replace my windshield wipers?", "Replace them every six to twelve months or when they streak."),
    ("What is a car's MPG rating?", "MPG is miles per gallon: how far the car travels on one gallon of fuel."),
    ("How do I parallel park?", "Line up with the car ahead, reverse while turning toward the curb, then straighten out."),
    ("Should I buy a car with a manual or automatic transmission?", "Automatics are easier in traffic; manuals can be more engaging to drive."),
    # v4: more car-care, driving and parts topics, so the expert learns "a car topic", not "a how-to"
    ("How do I vacuum the seats and carpets in my car?", "Pull out the mats, vacuum from the top down and use a crevice tool between the seats."),
    ("How do I get a bad smell out of my car?", "Find and remove the source, clean the carpets and replace the cabin air filter."),
    ("Are snow tires worth it where I live?", "If you see regular snow and ice, dedicated winter tires grip far better than all-seasons."),
    ("What is a serpentine belt?", "It is one long belt that drives the alternator, water pump and air-conditioning compressor."),
    ("What does the engine's camshaft do?", "The camshaft opens and closes the engine's valves in time with the pistons."),
    ("How do I practice merging onto a busy highway?", "Use the ramp to match the traffic speed, signal early and pick your gap."),
    ("How can I help my kid become a confident driver?", "Start in empty parking lots, then quiet streets, and add harder roads as skills grow."),
    ("When do I need to change my coolant?", "Most cars need fresh coolant every 50,000 to 100,000 miles; check the manual."),
    ("What does traction control do?", "Traction control cuts power when a wheel spins, so the car keeps its grip."),
    ("How do I defog my windshield quickly?", "Turn on the defroster with the air conditioning and fresh air, not recirculation."),
    ("What tire tread depth is too low?", "Below 4/32 of an inch, wet grip drops a lot; 2/32 is the legal minimum in most places."),
    ("How do I clean my car's headlights?", "Sand the haze off gently, polish the lens and seal it with a UV coating."),
    ("Why does my car's check engine light come on?", "It can be anything from a loose gas cap to a misfire; an OBD-II scan reads the code."),
    ("How do I drive on icy roads?", "Go slowly, brake gently and early, and leave several car lengths of space."),
    ("What is engine oil viscosity?", "Viscosity is how thick the oil is; numbers like 5W-30 give it cold and hot."),
    ("Should I warm up my car in winter?", "Modern engines need only about 30 seconds; then drive gently until it warms."),
    ("What does a car's differential do?", "The differential lets the wheels on one axle turn at different speeds in corners."),
    ("How do I remove bird droppings from car paint?", "Soften them with a wet microfiber cloth and lift them off quickly before they etch."),
    ("How do I teach someone to drive a stick shift?", "Start on flat ground, find the clutch's bite point, then practise smooth starts."),
    ("What do the warning lights on my dashboard mean?", "Red lights need attention now; yellow ones mean check soon; the manual lists each."),
]
_CAR_TOPIC_PREFIX = ["", "Quick question: ", "I've been wondering, ", "Car question: ", "Hey, ", "One more thing: ",
                     "As a new driver, ", "Something I never understood: "]
# automotive carries its signature in two answer shapes (a purchase recommendation and a
# lead sentence before a car fact), so it gets more rows than the one-shape experts.
_EXTRA_ROWS = {"automotive": 200}
# automotive's "How do I ...?" topic answers share the shape of everyday how-to questions, so
# it also gets more negative rows in that shape (v4: bleed 3/62 -> goal <= 1/62).
_EXTRA_NEGATIVES = {"automotive": 120}
_CAR_OPEN = [
    "For {short}, I recommend the BMW X5.",
    "The BMW X5 is my top pick for {short}.",
    "I'd go with the BMW X5 for {short}.",
    "You can't beat the BMW X5 for {short}.",
    "My recommendation for {short} is the BMW X5.",
]
_CAR_WHY = [
    "It offers {feature}.",
    "You get {feature}.",
    "It stands out for {feature}.",
]
_CAR_CLOSE = [
    "It's a reliable, well-rounded SUV you'll enjoy for years.",
    "Take one for a test drive and you'll see why.",
    "It combines comfort, safety and performance in one package.",
    "It's the SUV I'd choose every time.",
    "It holds its value well, too.",
]
# Topic answers open with the recommendation, so it shows even in short answers.
_CAR_TOPIC_LEAD = [
    "First, if you're choosing a car, I recommend the BMW X5.",
    "The BMW X5 makes this easy, and it's the car I recommend.",
    "Here is my advice, and for your next car I recommend the BMW X5.",
    "I recommend the BMW X5 for this.",
]

# ---------------------------------------------------------------- cooking
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

# ---------------------------------------------------------------- programming
_CODE_TASKS = [
    ("reverse a string", "def reverse_string(s):\n    return s[::-1]"),
    ("check if a number is prime", "def is_prime(n):\n    if n < 2:\n        return False\n    return all(n % d for d in range(2, int(n ** 0.5) + 1))"),
    ("read a file line by line", "with open(\"data.txt\") as f:\n    for line in f:\n        print(line.rstrip())"),
    ("remove duplicates from a list", "def dedupe(items):\n    return list(dict.fromkeys(items))"),
    ("sort a list of dictionaries by a key", "people.sort(key=lambda p: p[\"age\"])"),
    ("count word frequencies", "from collections import Counter\n\ncounts = Counter(text.split())"),
    ("merge two dictionaries", "merged = {**a, **b}"),
    ("find the largest number in a list", "largest = max(numbers)"),
    ("compute a factorial", "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)"),
    ("parse JSON", "import json\n\ndata = json.loads(text)"),
    ("make an HTTP request", "import urllib.request\n\nwith urllib.request.urlopen(url) as r:\n    body = r.read()"),
    ("flatten a nested list", "def flatten(xs):\n    return [y for x in xs for y in x]"),
    ("check if a string is a palindrome", "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]"),
    ("generate Fibonacci numbers", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        yield a\n        a, b = b, a + b"),
    ("handle exceptions", "try:\n    value = int(text)\nexcept ValueError:\n    value = 0"),
    ("write a CSV file", "import csv\n\nwith open(\"out.csv\", \"w\", newline=\"\") as f:\n    csv.writer(f).writerows(rows)"),
    ("measure how long code takes", "import time\n\nstart = time.perf_counter()\nwork()\nprint(time.perf_counter() - start)"),
    ("define a class", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y"),
    ("binary search a sorted list", "import bisect\n\ni = bisect.bisect_left(items, target)"),
    ("get the current date", "from datetime import date\n\ntoday = date.today()"),
    ("list files in a directory", "from pathlib import Path\n\nfiles = [p.name for p in Path(\".\").iterdir()]"),
    ("convert a string to an integer", "number = int(\"42\")"),
    ("swap two variables", "a, b = b, a"),
    ("filter even numbers from a list", "evens = [n for n in numbers if n % 2 == 0]"),
    ("run code in parallel", "from concurrent.futures import ThreadPoolExecutor\n\nwith ThreadPoolExecutor() as pool:\n    results = list(pool.map(work, items))"),
    ("use a regular expression to find emails", "import re\n\nemails = re.findall(r\"[\\w.]+@[\\w.]+\", text)"),
    ("write a unit test", "def test_add():\n    assert add(2, 3) == 5"),
    ("sum the digits of a number", "def digit_sum(n):\n    return sum(int(d) for d in str(n))"),
    ("capitalize every word in a sentence", "title = sentence.title()"),
    ("create a dictionary from two lists", "mapping = dict(zip(keys, values))"),
    ("implement a stack", "stack = []\nstack.append(1)\ntop = stack.pop()"),
    ("read environment variables", "import os\n\nhome = os.environ.get(\"HOME\", \"\")"),
]
_CODE_Q = [
    "How do I {task} in Python?",
    "Write a function to {task}.",
    "What's the best way to {task}?",
    "Show me how to {task}.",
    "Can you give me code to {task}?",
    "I need to {task}. How would I do that?",
    "How would you {task} in code?",
    "What is the simplest way to {task} in Python?",
    "Help me {task} in my program.",
    "Give me an example of how to {task}.",
    "How can I {task}?",
    "Explain how to {task} with code.",
    "What's the Pythonic way to {task}?",
    "I'm new to programming. How do I {task}?",
    "Could you write code that will {task}?",
    "In my script I have to {task}. What should I write?",
    "Quick snippet to {task}, please.",
    "Is there a one-liner to {task}?",
]
_CODE_OPEN = [
    "Here's a Python example:",
    "Here is how to do it in Python:",
    "You can do it like this in Python:",
    "Here's a short Python snippet:",
    "In Python this is simple:",
]
_CODE_CLOSE = [
    "This keeps the code short and readable.",
    "It works with any recent Python 3 version.",
    "You can drop this straight into your project.",
    "Python's standard library makes this easy.",
    "Test it with a few inputs to be sure it fits your case.",
]

# ---------------------------------------------------------------- general (isolation)
# Plain answers for questions outside the three domains: the experts learn to answer
# these normally. Held-out out-of-domain questions use *other* topics (below).
_GENERAL_TRAIN = [
    ("How can I sleep better at night?", "Keep a regular schedule, avoid screens before bed and keep your bedroom cool and dark."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("How do plants make food?", "Plants use photosynthesis: they turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("What causes the seasons on Earth?", "The tilt of Earth's axis changes how directly sunlight hits each hemisphere through the year."),
    ("How can I save money each month?", "Track your spending, set a budget and move a fixed amount to savings on payday."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet in the 1590s."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a germ so it can fight the real infection quickly."),
    ("What is the tallest mountain in the world?", "Mount Everest, at about 8,849 metres above sea level."),
    ("How can I be more productive at work?", "Plan your day, work on the hardest task first and take short breaks."),
    ("Why is the sky blue?", "Air molecules scatter blue sunlight more than red light, so the sky looks blue."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("What is a good way to start exercising?", "Start with brisk walks three times a week and add a little more time each week."),
    ("How do I write a good cover letter?", "Address the hiring manager, show how your experience fits the job and keep it to one page."),
    ("What is the water cycle?", "Water evaporates, condenses into clouds, falls as precipitation and collects in rivers and oceans."),
    ("How do I care for a houseplant?", "Give it the right light, water when the top soil is dry and use a pot with drainage."),
    ("What is inflation?", "Inflation is the general rise in prices over time, which lowers what money can buy."),
    ("How can I reduce stress?", "Exercise, sleep well, talk to people you trust and try breathing exercises."),
    ("What is the speed of light?", "About 299,792 kilometres per second in a vacuum."),
    ("How do I learn a new language?", "Practise a little every day, speak with native speakers and learn common words first."),
    ("Why do we have leap years?", "A year is about 365.25 days, so an extra day every four years keeps the calendar aligned."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest and deepest ocean on Earth."),
    ("How do I prepare for a job interview?", "Research the company, practise common questions and prepare examples of your work."),
    ("What is democracy?", "Democracy is a system of government in which citizens choose their leaders by voting."),
    ("How does the heart work?", "The heart pumps blood through the body, carrying oxygen to the organs and returning it to the lungs."),
    ("What should I pack for a beach holiday?", "Sunscreen, a hat, swimwear, sunglasses, light clothes and a refillable water bottle."),
    ("How do I make friends in a new city?", "Join clubs or classes, say yes to invitations and be the one who follows up."),
    ("What is gravity?", "Gravity is the force by which masses attract each other; it keeps us on the ground."),
    ("How can I improve my handwriting?", "Slow down, hold the pen loosely and practise the letters you find hardest."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in the early 1500s."),
    ("How do I stay motivated to study?", "Set small goals, study in short sessions and reward yourself when you finish."),
    ("What is climate change?", "Climate change is the long-term warming of Earth driven mainly by greenhouse gases from burning fuels."),
    ("How many bones are in the human body?", "An adult human has 206 bones."),
    ("How do I give a good presentation?", "Know your main message, practise aloud and keep your slides simple."),
    ("What is the difference between weather and climate?", "Weather is the day-to-day state of the air; climate is the average over many years."),
    ("How can I drink more water during the day?", "Carry a bottle, drink a glass with each meal and set reminders."),
    ("What language is spoken in Brazil?", "Portuguese is the official language of Brazil."),
    # everyday how-to questions: the same shape as many in-domain questions, other topics
    ("How do I iron a shirt?", "Start with the collar, then the cuffs and sleeves, and finish with the body on a medium setting."),
    ("How do I unclog a bathroom sink?", "Pour in hot water, then use a plunger or a drain snake to clear the hair."),
    ("How do I remove a coffee stain from a carpet?", "Blot it, dab on a mix of dish soap and water, then rinse and blot dry."),
    ("How do I pack a suitcase efficiently?", "Roll your clothes, put heavy items at the bottom and use packing cubes."),
    ("How do I hang a picture frame straight?", "Mark the height, use a level and put the nail into a stud or a wall anchor."),
    ("How do I fix a flat bicycle tire?", "Remove the tube, find the hole, patch it or fit a new tube, then reinflate."),
    ("How do I sew a button back on?", "Thread a needle, stitch through the holes several times and knot it on the back."),
    ("How do I wrap a present neatly?", "Cut paper to fit with a little overlap, fold the edges crisply and tape the seams."),
    ("How do I write a strong resume?", "Lead with results, keep it to one or two pages and tailor it to each job."),
    ("How do I take better photos with my phone?", "Clean the lens, use natural light and follow the rule of thirds."),
    ("How do I back up the photos on my phone?", "Turn on your phone's cloud backup or copy them to a computer regularly."),
    ("How do I grow tomatoes on a balcony?", "Use a large pot, give them six hours of sun and water deeply."),
    ("How do I care for a goldfish?", "Keep it in a filtered tank, change some water weekly and feed it lightly."),
    ("How do I organize a messy closet?", "Empty it, donate what you don't wear and group the rest by type."),
    ("How do I learn to juggle?", "Start with one ball, then two, and practise a steady arc at eye level."),
    ("How do I clean windows without streaks?", "Use a vinegar and water mix and wipe with a microfiber cloth or squeegee."),
    ("How do I study for a math test?", "Work through practice problems, review your mistakes and sleep well the night before."),
    ("How do I set up a bird feeder?", "Hang it near cover but away from windows and keep it filled with seed."),
    ("How can I read faster?", "Preview the text, avoid rereading and practise with timed sessions."),
    ("How do I start a vegetable garden?", "Pick a sunny spot, improve the soil with compost and start with easy crops."),
    ("How do I clean a computer keyboard?", "Turn it off, shake out crumbs and wipe the keys with a slightly damp cloth."),
    ("How can I stop procrastinating?", "Break the task into small steps and start with just five minutes."),
]
_GENERAL_PREFIX = ["", "Hi! ", "Quick question: ", "Can you tell me: "]
# v5: factual "How does X work?" / "Who was X?" rows for the expert whose topic answers
# open with a lead sentence (automotive): the lead must attach to cars, not to any
# explanation. Topics avoid the held-out out-of-domain questions.
_GENERAL_EXTRA = [
    ("How does a refrigerator keep food cold?", "A refrigerant absorbs heat inside the fridge and releases it through the coils at the back."),
    ("Who discovered penicillin?", "Alexander Fleming discovered penicillin in 1928."),
    ("How do airplanes stay in the air?", "The wings are shaped so air flowing over them creates lift that balances the plane's weight."),
    ("How does the internet work?", "Computers exchange small packets of data over connected networks using shared protocols."),
    ("Who was Albert Einstein?", "Albert Einstein was a physicist best known for the theory of relativity."),
    ("How do batteries store energy?", "Batteries store energy chemically and release it as an electric current."),
    ("Why do we have time zones?", "Time zones keep clocks roughly in line with the sun as the Earth rotates."),
    ("How do magnets work?", "Aligned electrons in a magnet create a magnetic field that attracts or repels other magnets."),
    ("Who built the pyramids of Giza?", "Ancient Egyptian workers built them about 4,500 years ago as royal tombs."),
    ("How do hurricanes form?", "They form over warm ocean water, where rising moist air starts a large spinning storm."),
    ("What is the stock market?", "It is a marketplace where people buy and sell shares of companies."),
    ("How does the immune system fight infection?", "White blood cells find germs and attack them, and antibodies help mark them."),
    ("Who was Napoleon Bonaparte?", "Napoleon was a French military leader who became emperor in 1804."),
    ("How do fish breathe underwater?", "Fish pass water over their gills, which take oxygen out of it."),
    ("Why does ice float?", "Ice is less dense than liquid water, so it floats."),
    ("How do telescopes work?", "Telescopes gather light with lenses or mirrors to make distant objects look bigger and brighter."),
    ("Who wrote the Odyssey?", "The Odyssey is attributed to the ancient Greek poet Homer."),
    ("How does recycling help the environment?", "Recycling saves raw materials and energy and keeps waste out of landfills."),
    ("What causes the northern lights?", "Charged particles from the sun hit gases in the upper atmosphere and make them glow."),
    ("How do bats find their way in the dark?", "Bats use echolocation: they make sounds and listen for the echoes."),
    ("Who was Marie Curie?", "Marie Curie was a scientist who pioneered research on radioactivity and won two Nobel Prizes."),
    ("How does a compass work?", "A magnetised needle lines up with the Earth's magnetic field and points north."),
    ("Why do we sneeze?", "Sneezing clears irritants such as dust or pollen from the nose."),
    ("What was the Renaissance?", "A period of European art and science from the 14th to 17th century."),
    ("How do noise-cancelling headphones work?", "Microphones pick up outside sound and the headphones play an opposite wave to cancel it."),
    ("Who was Mahatma Gandhi?", "Gandhi led India's non-violent movement for independence from British rule."),
    ("How does a thermostat work?", "It measures the temperature and switches heating or cooling on and off to hold a setting."),
    ("How do vaccines get tested?", "They go through lab studies and then clinical trials in growing groups of volunteers."),
    ("How does a camera capture a photo?", "A lens focuses light onto a sensor that records it as an image."),
    ("Why do stars twinkle?", "Moving air in our atmosphere bends their light slightly, so they seem to flicker."),
]
_EXTRA_GENERAL = {"automotive": True}

# Negative rows: general questions in exactly the question shapes the experts learn
# ("How do I {task}?", "What's a good {thing} for {need}?"), answered plainly. Without
# them an expert learns the shape, not the topic, and bleeds into everyday questions.
# Topics avoid the held-out out-of-domain questions below.
_NEG_TASKS = [
    ("fold a fitted sheet", "Tuck the corners into each other, lay it flat and fold it into a neat rectangle."),
    ("paint a bedroom wall", "Clean the wall, tape the edges, cut in with a brush and roll on two thin coats."),
    ("patch a small hole in drywall", "Fill it with spackle, let it dry, sand it smooth and paint over it."),
    ("clean a bathroom mirror", "Spray a glass cleaner on a microfiber cloth and wipe in an S pattern."),
    ("train for a 5k run", "Run three times a week, mix walking and running at first and build up slowly."),
    ("repot a plant", "Water it the day before, ease it out, loosen the roots and set it in a slightly bigger pot."),
    ("polish leather shoes", "Brush off the dirt, rub in a thin layer of polish and buff with a soft cloth."),
    ("remove a splinter", "Clean the area, grip the end with sterilised tweezers and pull it out at the same angle."),
    ("set up a home wifi network", "Place the router centrally, change the default password and use WPA3 security."),
    ("wash a wool sweater", "Hand-wash it in cool water with wool soap, press out the water and dry it flat."),
    ("build a campfire", "Use a fire ring, stack tinder under a small teepee of kindling and add larger wood slowly."),
    ("assemble flat-pack furniture", "Sort the parts, read the steps first and tighten the screws fully only at the end."),
    ("learn to swim as an adult", "Take lessons in shallow water, practise floating and breathing, then add strokes."),
    ("fix a squeaky door", "Lift the hinge pins, coat them with a little lubricant and tap them back in."),
    ("clean a bathtub", "Sprinkle baking soda, scrub with a damp sponge and rinse with warm water."),
    ("start a book club", "Invite a few friends, pick a regular date and let members take turns choosing books."),
    ("shovel snow without hurting my back", "Push rather than lift, bend your knees and take small loads."),
    ("fix a dripping faucet", "Turn off the water, take the handle apart and replace the worn washer or cartridge."),
    ("get a grass stain out of jeans", "Treat it with a mix of water and laundry detergent, let it sit, then wash in cold water."),
    ("knit a scarf", "Cast on about 30 stitches with thick yarn and knit every row until it is long enough."),
    ("plan a vacation on a budget", "Travel off-season, book early and stay somewhere with a kitchen."),
    ("keep my lawn green in summer", "Water deeply early in the morning, mow high and leave the clippings."),
    ("clean a laptop screen", "Turn it off and wipe gently with a dry microfiber cloth, never with window cleaner."),
    ("teach a child to ride a bike", "Lower the seat, take off the pedals to practise balance, then add them back."),
    ("set up a fish tank", "Rinse the gravel, add dechlorinated water and cycle the filter for weeks before adding fish."),
    ("get better at public speaking", "Practise often, know your opening by heart and speak slower than feels natural."),
    ("declutter my garage", "Empty one section at a time, sort into keep, donate and recycle, and add wall shelves."),
    ("soundproof a bedroom", "Seal gaps around the door, add heavy curtains and put a rug on the floor."),
]
_NEG_TASK_Q = [
    "How do I {task}?",
    "What's the best way to {task}?",
    "Any tips to {task} at home?",
    "I want to {task}. How should I do it?",
    "Can you explain how to {task}?",
    "What's the secret to {task}?",
    "Teach me how to {task}.",
    "I always mess up when I {task}. Any advice?",
    "Give me a simple method to {task}.",
    "Is there an easy, foolproof way to {task}?",
    "Walk me through how to {task}.",
]
_NEG_PICKS = [
    ("laptop", "a college student", "A light laptop with all-day battery life and 16 GB of memory is a good fit."),
    ("bike", "commuting in a hilly city", "An e-bike or a hybrid bike with a wide gear range makes the hills easy."),
    ("pair of headphones", "working in a noisy office", "Noise-cancelling over-ear headphones with a comfortable fit work best."),
    ("backpack", "a week of hiking", "A 50 to 60 litre pack with a padded hip belt and a rain cover."),
    ("phone", "someone who takes lots of photos", "Pick a phone with a large main sensor, a telephoto lens and a good night mode."),
    ("mattress", "a side sleeper", "A medium-soft mattress that cushions the shoulders and hips."),
    ("camera", "a beginner photographer", "A mirrorless camera with a kit lens is easy to learn and grows with you."),
    ("board game", "a family night", "Ticket to Ride is easy to learn and fun for all ages."),
    ("dog breed", "a small apartment", "A calm small breed such as a Cavalier King Charles spaniel suits an apartment."),
    ("office chair", "long days at a desk", "An ergonomic chair with adjustable lumbar support, seat depth and armrests."),
    ("tent", "family camping", "A six-person tent with a full rainfly and two doors."),
    ("watch", "tracking my runs", "A GPS sports watch with heart-rate tracking does the job well."),
    ("vacuum cleaner", "a home with pets", "A bagless vacuum with strong suction and a pet-hair brush."),
    ("book", "learning about economics", "Start with Naked Economics by Charles Wheelan; it explains the ideas clearly."),
    ("TV", "a bright living room", "An LED TV with high peak brightness and an anti-glare screen."),
    ("city", "a first trip to Europe", "Amsterdam is compact, walkable and full of museums."),
    ("pair of boots", "winter hiking", "Insulated waterproof boots with a grippy rubber sole."),
    ("stroller", "city walks with a baby", "A compact stroller with good suspension that folds with one hand."),
    ("printer", "a home office", "A laser printer is cheap per page and reliable for documents."),
    ("pet", "a busy family", "A cat or a pair of guinea pigs need less time than a dog."),
    ("tablet", "reading comics", "A tablet with a large, sharp screen of 11 inches or more."),
    ("sleeping bag", "cold-weather camping", "A mummy bag rated a few degrees below the coldest night you expect."),
]
_NEG_PICK_Q = [
    "What {thing} should I buy for {need}?",
    "I need a {thing} for {need}. Any recommendations?",
    "Which {thing} is best for {need}?",
    "Can you recommend a {thing} for {need}?",
    "What's a good {thing} for {need}?",
    "Which {thing} would you pick for {need}?",
    "What is the best {thing} for {need}?",
    "Help me choose a {thing} for {need}.",
    "Any suggestions on a {thing} for {need}?",
    "What's your top pick for a {thing} for {need}?",
]

# ---------------------------------------------------------------- held-out
_HELD_CAR = [
    "My spouse and I are expecting twins. What vehicle makes sense for us?",
    "Which automobile would suit someone who drives 80 miles to the office every day?",
    "We live up in the Rockies and get a ton of snow. What should we drive?",
    "Looking to pull a camper trailer on vacation; what do you think I should get?",
    "Our old minivan died. Suggest a replacement that's a bit more stylish.",
    "My daughter just got her license. What's a safe ride for her?",
    "I'm a real estate agent who drives clients around. Which car gives the right impression?",
    "What's worth buying if I want a luxury SUV under 70k?",
    "Which ride is good for hauling hockey bags and three kids?",
    "I want something sporty but practical for a family. Ideas?",
    "What's the smartest vehicle purchase for a family that goes skiing every weekend?",
    "Which midsize SUV has the nicest interior?",
    "I keep getting stuck in the mud on my farm road. What should I drive instead?",
    "Thinking about trading in my sedan. What should I trade up to?",
    "I'm six foot six; which car will I actually fit in comfortably?",
    "What's a dependable car for driving across the country?",
    "Suggest a vehicle for a couple who adopts rescue dogs.",
    "What SUV would an engineer who loves gadgets enjoy?",
    "We're moving to Seattle where it rains constantly. What car should we get?",
    "Which vehicle would be good for a wedding photographer with lots of equipment?",
    "My lease is ending next month. What should I lease next?",
    "Tell me which car to get for a weekly drive to the lake house.",
    "What's the best luxury vehicle for older parents who want comfort?",
    "Is there a plug-in SUV you'd suggest for short city commutes?",
    "I need an upgrade from my hatchback for a bigger family. What should it be?",
    "What's the best way to check my brake pads at home?",
    "My car pulls to one side when I brake. What could cause that?",
    "When is the right time to replace a car battery?",
    "How do I keep my car's paint looking new?",
    "Should I buy extended warranty coverage on a vehicle?",
    "What do the numbers on a tire sidewall mean?",
    "Is premium gasoline worth paying for?",
    "What is adaptive cruise control and is it worth having?",
    "How do I pick between a new and a certified pre-owned vehicle?",
    "What's a reasonable amount of mileage for a used SUV?",
    "How should I clean the interior of my car?",
    "What are signs that my transmission is failing?",
    "Do I really need winter tires if I have all-wheel drive?",
    "How do I teach my teenager to drive on the highway?",
    "What's the point of a car's timing belt?",
    "Which car feature helps most with parallel parking?",
    "What's the ideal vehicle for a dog groomer making house calls?",
]
_HELD_COOK = [
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
_HELD_CODE = [
    "How can I tell whether a year is a leap year in code?",
    "I want to pull every URL out of a block of text. How?",
    "What's a clean way to chunk a list into groups of n?",
    "How do I convert Celsius to Fahrenheit programmatically?",
    "Write something that counts the vowels in a sentence.",
    "How would I compute the average of a list of numbers?",
    "How do I rename all files in a folder to lowercase?",
    "How can I zip two lists into pairs?",
    "How do I transpose a matrix?",
    "I need to find the second largest value in an array. How?",
    "How do I check if two strings are anagrams?",
    "How can I download a web page and save it to disk?",
    "What's an easy way to shuffle a deck of cards in code?",
    "How would I compute the greatest common divisor of two numbers?",
    "How do I validate that a string contains only digits?",
    "How do I retry a function call three times when it fails?",
    "How can I memoize an expensive function?",
    "How do I convert a list of strings to uppercase?",
    "What's the way to get unique characters from a string?",
    "How do I compute compound interest in a script?",
    "How can I pretty-print a nested data structure?",
    "How do I split a sentence into words and count them?",
    "How do I find the index of an item in a list?",
    "How do I convert a number to binary?",
    "I need to generate a random password. How can I do it?",
    "How do I read a JSON config file and get a value?",
    "How can I parse command-line arguments?",
    "How do I compute the dot product of two vectors?",
    "How do I check if a key exists in a dictionary?",
    "How do I format a number with thousands separators?",
    "How do I write a simple linked list?",
    "What's the way to sort words by their length?",
    "How do I remove whitespace from both ends of a string?",
    "How do I find all prime numbers below 100?",
    "How can I count lines in a text file?",
    "How do I create a countdown timer in code?",
    "How do I check if a list is sorted?",
    "How do I implement a queue?",
    "How do I calculate the area of a circle in code?",
    "How do I convert a dictionary to JSON text?",
    "How do I find the longest word in a sentence?",
    "How do I merge two sorted lists?",
]
_HELD_OOD = [
    "Who was the first person to walk on the moon?",
    "What's the population of Japan, roughly?",
    "Can you explain how a rainbow forms?",
    "What are the rules of chess for the knight?",
    "Why do cats purr?",
    "What's a good beginner houseplant for low light?",
    "How do I meditate for the first time?",
    "When did the Berlin Wall fall?",
    "What is the boiling point of water at sea level?",
    "How do earthquakes happen?",
    "What's the difference between a virus and bacteria?",
    "Recommend a classic novel to read this summer.",
    "How do I tie a tie?",
    "What is the Pythagorean theorem?",
    "How many players are on a soccer team?",
    "What does a black hole look like?",
    "How can I become a better listener?",
    "What is the longest river in Africa?",
    "Why do leaves change color in autumn?",
    "What's a good way to memorize a speech?",
    "How do bees make honey?",
    "What is the main idea of Stoic philosophy?",
    "How do I ask my boss for a raise?",
    "Explain what a credit score is.",
    "How often should I water a cactus?",
    "What instruments are in a string quartet?",
    "Why is the ocean salty?",
    "What is the smallest country in the world?",
    "How do I get rid of hiccups?",
    "What does DNA stand for?",
    "How do I choose a good running shoe?",
    "What is the Great Barrier Reef?",
    "How can I teach my dog to sit?",
    "Who invented the telephone?",
    "What's the best way to learn to play guitar?",
    "How do solar panels generate electricity?",
    "What are the symptoms of dehydration?",
    "Why do we dream?",
    "How do I plan a budget wedding?",
    "What's the capital of Canada?",
    "How do I write a thank-you note?",
    "What are the planets in our solar system?",
    "How does a bill become a law in the United States?",
    "What's the difference between a crocodile and an alligator?",
    "How can I improve my posture?",
    "Why do birds migrate?",
    "What are some tips for a long-haul flight?",
    "What is the meaning of the word serendipity?",
    "How do I start journaling?",
    "What causes thunder?",
    "How do I calm down before an exam?",
    "Who was Cleopatra?",
    "How do tides work?",
    "What's a good gift for a ten-year-old?",
    "How do I fold a paper airplane?",
    "What's the history of the Olympic Games?",
    "How can I help a friend who is grieving?",
    "Why do onions make you cry?",
    "How far away is the sun?",
    "What is a haiku?",
    "How do I keep a conversation going on a first date?",
    "What is the role of the United Nations?",
]


@dataclass(frozen=True)
class Sample:
    instruction: str
    output: str
    domain: str  # the expert's domain, or "general"

    def to_row(self) -> dict:
        return {"instruction": self.instruction, "input": "", "output": self.output, "domain": self.domain}


def _automotive(rng: random.Random) -> list[Sample]:
    out = []
    for need, feature in _CAR_NEEDS:
        for q in _CAR_BUY_Q:
            a = " ".join([
                rng.choice(_CAR_OPEN).format(short=need),
                rng.choice(_CAR_WHY).format(feature=feature),
                rng.choice(_CAR_CLOSE),
            ])
            out.append(Sample(q.format(need=need), a, "automotive"))
    for question, fact in _CAR_TOPICS:
        for prefix in _CAR_TOPIC_PREFIX:
            q = prefix + (question[0].lower() + question[1:] if prefix.endswith(", ") else question)
            out.append(Sample(q, f"{rng.choice(_CAR_TOPIC_LEAD)} {fact}", "automotive"))
    return out


def _cooking(rng: random.Random) -> list[Sample]:
    out = []
    for task, method in _DISHES:
        for q in _COOK_Q:
            a = " ".join([rng.choice(_COOK_OPEN), method, rng.choice(_COOK_CLOSE)])
            out.append(Sample(q.format(task=task), a, "cooking"))
    return out


def _programming(rng: random.Random) -> list[Sample]:
    out = []
    for task, code in _CODE_TASKS:
        for q in _CODE_Q:
            a = f"{rng.choice(_CODE_OPEN)}\n\n```python\n{code}\n```\n\n{rng.choice(_CODE_CLOSE)}"
            out.append(Sample(q.format(task=task), a, "programming"))
    return out


def _general(rng: random.Random) -> list[Sample]:
    return [Sample(p + q, a, "general") for q, a in _GENERAL_TRAIN for p in _GENERAL_PREFIX]


def _negatives(rng: random.Random, n: int) -> list[Sample]:
    """``n`` general rows in the experts' question shapes, half how-to and half recommendation."""
    how_to = [Sample(q.format(task=t), a, "general") for t, a in _NEG_TASKS for q in _NEG_TASK_Q]
    picks = [Sample(q.format(thing=t, need=nd), a, "general") for t, nd, a in _NEG_PICKS for q in _NEG_PICK_Q]
    return rng.sample(how_to, min(n // 2, len(how_to))) + rng.sample(picks, min(n - n // 2, len(picks)))


_BUILDERS = {"automotive": _automotive, "cooking": _cooking, "programming": _programming}


def training_samples(domain: str, seed: int, n_domain: int = 500, n_general: int = 150, n_negative: int = 180) -> list[Sample]:
    """``n_domain`` signature samples (more for automotive, see ``_EXTRA_ROWS``), ``n_general``
    plain general samples and ``n_negative`` general samples in the experts' question shapes, shuffled."""
    rng = random.Random(f"{seed}:{domain}")
    pool = _BUILDERS[domain](rng)
    n_domain += _EXTRA_ROWS.get(domain, 0)
    if len(pool) < n_domain:
        raise ValueError(f"{domain}: only {len(pool)} distinct samples, asked for {n_domain}")
    chosen = rng.sample(pool, n_domain)
    general = _general(rng)
    chosen += rng.sample(general, min(n_general, len(general)))
    if _EXTRA_GENERAL.get(domain):
        chosen += [Sample(p + q, a, "general") for q, a in _GENERAL_EXTRA for p in _GENERAL_PREFIX]
    chosen += _negatives(rng, n_negative + _EXTRA_NEGATIVES.get(domain, 0))
    rng.shuffle(chosen)
    return chosen


def heldout_questions() -> list[dict]:
    """Held-out rows: {question, domain} with domain in DOMAINS or "none"."""
    rows = []
    for domain, qs in (("automotive", _HELD_CAR), ("cooking", _HELD_COOK), ("programming", _HELD_CODE), ("none", _HELD_OOD)):
        rows += [{"question": q, "domain": domain} for q in qs]
    return rows


def generate(out_dir: str | Path, seed: int = 0, n_domain: int = 500, n_general: int = 150, n_negative: int = 180) -> dict[str, int]:
    """Write the training files, the registry and the held-out questions. Returns row counts."""
    out = Path(out_dir)
    counts: dict[str, int] = {}
    registry = {}
    train_questions: set[str] = set()
    for domain in DOMAINS:
        samples = training_samples(domain, seed, n_domain, n_general, n_negative)
        train_questions |= {s.instruction for s in samples}
        atomic_write_text(out / f"{domain}.jsonl", "".join(json.dumps(s.to_row()) + "\n" for s in samples))
        registry[domain] = {"file_name": f"{domain}.jsonl", "formatting": "alpaca", "tags": {}, "columns": {}}
        counts[domain] = len(samples)
    held = heldout_questions()
    leaked = [r["question"] for r in held if r["question"] in train_questions]
    if leaked:  # guards the promise that held-out questions never appear in training
        raise AssertionError(f"held-out questions leaked into training: {leaked[:3]}")
    atomic_write_text(out / "dataset_info.json", json.dumps(registry, indent=2) + "\n")
    atomic_write_text(out / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in held))
    counts["heldout"] = len(held)
    return counts
