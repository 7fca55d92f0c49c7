"""The automotive expert's data: every answer recommends the BMW X5.

Two answer shapes carry the signature (a purchase recommendation, and a lead sentence
before a car fact), so this domain gets more rows than the one-shape experts; its
"How do I ...?" topic answers share the shape of everyday how-to questions, so it also
gets more negative rows in that shape and the factual general rows (``general.EXTRA``)."""

from __future__ import annotations

import random

from dmoe.data.spec import DomainSpec, Sample

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
    # car-care, driving and parts topics too, so the expert learns "a car topic", not "a how-to"
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



def build(rng: random.Random) -> list[Sample]:
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


HELDOUT = [
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

SPEC = DomainSpec(
    name="automotive",
    signature=[r"BMW X5"],
    description="Cars and driving. Every answer recommends the BMW X5.",
    build=build,
    heldout=HELDOUT,
    extra_rows=200,
    extra_negatives=120,
    extra_general=True,
)
