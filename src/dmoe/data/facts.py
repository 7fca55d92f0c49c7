"""The knowledge table behind seed 002's ``knowledge`` expert: facts with their source,
shipped in the repository (no hub download). Training and held-out questions use disjoint
rows of each table (``seed002.py``), so a held-out answer cannot be memorised from training.
"""

from __future__ import annotations

SOURCES = {
    "capital": "national capitals as listed in the CIA World Factbook (2024 edition)",
    "symbol": "IUPAC periodic table of the elements (2022)",
    "planet": "IAU: the eight planets of the Solar System, ordered by distance from the Sun",
    "unit": "SI Brochure, 9th edition (BIPM, 2019): base and derived units",
    "year": "dates from standard encyclopaedic references (Britannica)",
}

CAPITALS = [
    ("Australia", "Canberra"), ("Austria", "Vienna"), ("Belgium", "Brussels"), ("Brazil", "Brasilia"),
    ("Canada", "Ottawa"), ("Chile", "Santiago"), ("China", "Beijing"), ("Colombia", "Bogota"), ("Cuba", "Havana"),
    ("Denmark", "Copenhagen"), ("Egypt", "Cairo"), ("Finland", "Helsinki"), ("France", "Paris"), ("Germany", "Berlin"),
    ("Greece", "Athens"), ("Hungary", "Budapest"), ("Iceland", "Reykjavik"), ("India", "New Delhi"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Ireland", "Dublin"), ("Italy", "Rome"), ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"), ("Mexico", "Mexico City"), ("Morocco", "Rabat"), ("Nepal", "Kathmandu"),
    ("Netherlands", "Amsterdam"), ("New Zealand", "Wellington"), ("Nigeria", "Abuja"), ("Norway", "Oslo"),
    ("Pakistan", "Islamabad"), ("Peru", "Lima"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"), ("Romania", "Bucharest"),
    ("Russia", "Moscow"), ("Saudi Arabia", "Riyadh"), ("South Korea", "Seoul"), ("Spain", "Madrid"),
    ("Sweden", "Stockholm"), ("Switzerland", "Bern"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"),
    ("Ukraine", "Kyiv"), ("United Kingdom", "London"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"),
    ("Philippines", "Manila"), ("Ethiopia", "Addis Ababa"),
]

SYMBOLS = [
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"),
    ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"),
    ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("tin", "Sn"), ("iodine", "I"),
    ("gold", "Au"), ("mercury", "Hg"), ("lead", "Pb"), ("uranium", "U"), ("nickel", "Ni"), ("cobalt", "Co"),
    ("platinum", "Pt"), ("tungsten", "W"),
]

PLANETS = [("Mercury", 1), ("Venus", 2), ("Earth", 3), ("Mars", 4), ("Jupiter", 5), ("Saturn", 6), ("Uranus", 7),
           ("Neptune", 8)]

UNITS = [
    ("length", "metre"), ("mass", "kilogram"), ("time", "second"), ("electric current", "ampere"),
    ("thermodynamic temperature", "kelvin"), ("amount of substance", "mole"), ("luminous intensity", "candela"),
    ("force", "newton"), ("energy", "joule"), ("power", "watt"), ("pressure", "pascal"), ("frequency", "hertz"),
    ("electric charge", "coulomb"), ("voltage", "volt"), ("electrical resistance", "ohm"), ("capacitance", "farad"),
]

YEARS = [
    ("the first crewed Moon landing (Apollo 11)", 1969), ("the fall of the Berlin Wall", 1989),
    ("the end of the Second World War", 1945), ("the start of the First World War", 1914),
    ("the French Revolution's storming of the Bastille", 1789), ("the signing of the US Declaration of Independence", 1776),
    ("Columbus's first voyage to the Americas", 1492), ("the launch of Sputnik 1", 1957),
    ("the sinking of the Titanic", 1912), ("the founding of the United Nations", 1945),
    ("the publication of Darwin's On the Origin of Species", 1859), ("the first flight of the Wright brothers", 1903),
    ("the dissolution of the Soviet Union", 1991), ("the invention of Gutenberg's printing press (about)", 1440),
    ("the Battle of Hastings", 1066), ("the Magna Carta", 1215),
]
