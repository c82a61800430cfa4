//! A generated text retrieval collection in BEIR layout, small enough to run the whole RRRA
//! pipeline (encode, mine, train, adapt, rerank) in minutes on a laptop CPU.
//!
//! The collection is about invented **subjects**, towns and animal species, each described
//! under six **aspects** (a town's climate, economy, history, food, transport and festivals; a
//! species' habitat, diet, appearance, behaviour, breeding and conservation). A *topic* is one
//! (subject, aspect) pair, and a query asks about one topic ("what is the weather usually like
//! in Varelholm during the year").
//!
//! - **Relevant documents** are the topic's facts: one to `max_relevant` documents, each
//!   stating a different fact about the same aspect of the same subject, mostly worded
//!   without the query's keywords ("Winters in Varelholm are long and icy ..."). They are
//!   relevant by meaning, not by shared words, so a pretrained encoder finds most of them but
//!   not all.
//! - **Hard negatives** arise from the structure: the subject's other aspects (same name,
//!   another attribute), the same aspect of other subjects (the same fact templates with
//!   another name), and above all of *siblings*, subjects whose names share a stem
//!   ("Varelholm", "Varelwick"), which an encoder barely tells apart. **Decoys** add the
//!   lexical trap: a document naming the subject with the query's own words but about
//!   something else ("The Varelholm Weather Society is an amateur choir ...").
//!
//! Every text comes from the word lists below, expanded by [`Rng`] from the spec's seed, so a
//! spec always yields the same bytes. Topics are split between train and test queries
//! (disjoint), over one shared corpus. Ids are `d00042` and `q0007`; qrels hold score 1.

use crate::error::{Error, Result};
use crate::index::synthetic::Rng;
use crate::util::atomic_write;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// What to generate. The defaults give 2,313 documents (at most 35 word-pieces), 300 train and
/// 100 test queries; pretrained all-MiniLM-L6-v2 scores nDCG@10 0.65, MRR@10 0.76 and
/// Recall@100 0.996 on the test split (0.66, 0.78, 0.997 on train).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub seed: u64,
    /// Number of subjects (alternately families of towns and of species); six topics each.
    pub entities: usize,
    pub train_queries: usize,
    pub test_queries: usize,
    /// Relevant documents per topic are drawn in `1..=max_relevant` (at most 6), rarely 1.
    pub max_relevant: usize,
    /// Probability that a topic also gets a decoy document.
    pub decoy_rate: f64,
    /// Subjects per family of look-alike names (1 to 6); 1 means no siblings.
    pub family_size: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            seed: 42,
            entities: 100,
            train_queries: 300,
            test_queries: 100,
            max_relevant: 5,
            decoy_rate: 0.6,
            family_size: 4,
        }
    }
}

/// What [`write_collection`] wrote: counts of documents, queries and (query, document) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectionSummary {
    pub documents: usize,
    pub train_queries: usize,
    pub test_queries: usize,
    pub train_pairs: usize,
    pub test_pairs: usize,
}

/// One aspect of a kind of subject. Templates name the subject `{e}`, pick one of `{a|b|c}`
/// and draw a number from `{lo-hi}`.
struct Aspect {
    /// Used in some titles ("Varelholm: Climate").
    label: &'static str,
    /// How users ask about the aspect (8–12 words once expanded).
    queries: &'static [&'static str],
    /// Facts answering it; each relevant document states a different one.
    facts: &'static [&'static str],
    /// Sentences sharing the queries' words but not about the aspect.
    decoys: &'static [&'static str],
}

/// A kind of subject: how names are built and what there is to say.
struct Kind {
    /// Shown in some titles ("Varelholm (town)").
    noun: &'static str,
    /// Name endings; the members of a family share a stem and differ in ending.
    endings: &'static [&'static str],
    /// Animal nouns after the name, one per family ("Varelian heron"); empty for towns.
    animals: &'static [&'static str],
    aspects: &'static [Aspect; 6],
}

const TOWN: Kind = Kind {
    noun: "town",
    endings: &["holm", "wick", "stead", "ford", "dale", "thorpe"],
    animals: &[],
    aspects: &[
        Aspect {
            label: "Climate",
            queries: &[
                "what is the weather usually like in {e} during the year",
                "what kind of climate does the town of {e} have",
                "how do the seasons and temperatures change over the year in {e}",
                "{e} climate: typical rainfall, snow and temperatures by season",
            ],
            facts: &[
                "Winters in {e} are {long|harsh|bitter} and {snowy|icy|grey}, and the harbour usually freezes by {December|January}.",
                "Summer days in {e} seldom climb above {18-26} degrees, and evenings stay cool enough for a coat.",
                "Thick fog drifts in from the {sea|lake|marshes} on most mornings, so {e} sees little sun before noon.",
                "Rain falls in {e} on about {120-200} days a year, most heavily in {October|November|April}.",
                "Strong {westerly|northerly|coastal} gales sweep through {e} in autumn and often bring down power lines.",
                "Spring comes late to {e}, and frost can still cover its fields well into {April|May}.",
            ],
            decoys: &[
                "The {e} Weather Society is an amateur choir that has rehearsed in the town hall since {1950-1990}.",
                "Four Seasons in {e} is a novel about a baker's family, written by a local schoolteacher.",
                "A weather vane shaped like a {fox|ship|rooster} sits on the church tower of {e} and is popular with photographers.",
            ],
        },
        Aspect {
            label: "Economy",
            queries: &[
                "what do most people in {e} do for work and money",
                "main industries and jobs in the town of {e} today",
                "how does the local economy of {e} earn its income",
                "which businesses and employers are the most important in {e}",
            ],
            facts: &[
                "Most families in {e} live from {fishing|dairy farming|forestry|sheep farming}, which employs about {30-60} percent of workers.",
                "A {paper mill|shipyard|brewery|glass factory} on the edge of {e} is the largest employer, with around {200-900} staff.",
                "Tourism brings a growing share of income to {e}, especially from {walkers|anglers|cyclists} in summer.",
                "Traders from nearby villages come to the livestock auction in {e} every week to buy and sell cattle.",
                "Unemployment in {e} fell below {3-8} percent after a {logistics|software|textile} company opened a depot there.",
                "Many residents of {e} commute to the city for jobs in offices, shops and hospitals.",
            ],
            decoys: &[
                "Money for {e} was a television quiz show of the {1970s|1980s}, filmed in the community hall.",
                "The {e} Workers' Club runs a chess tournament every winter and a brass band in spring.",
                "The Business of {e} is a stage comedy about two rival mayors who swap their jobs for a week.",
            ],
        },
        Aspect {
            label: "History",
            queries: &[
                "when was {e} founded and what is its history",
                "history of the town of {e} through the past centuries",
                "what important historical events took place in {e} long ago",
                "who first settled in {e} and how did the town grow",
            ],
            facts: &[
                "{e} was founded around the year {1100-1500} by {monks|fishermen|farmers|merchants} who settled beside the river.",
                "During the great {fire|flood|plague} of {1600-1800}, much of {e} was destroyed and later rebuilt in stone.",
                "The railway reached {e} in {1840-1900}, and its population doubled within a generation.",
                "The oldest building in {e} is a {chapel|watchtower|bridge} dating from the {twelfth|thirteenth|fourteenth} century.",
                "{e} received its charter in {1400-1700}, which gave it the right to hold a weekly market.",
                "Roman coins and pottery found near {e} show that people lived there long before the town existed.",
            ],
            decoys: &[
                "The {e} History Club is a rock band formed in {2001-2015} by four students.",
                "Past Lives of {e} is a crime drama set in a modern police station.",
                "The {e} Founders' Cup is a football tournament for children held every August.",
            ],
        },
        Aspect {
            label: "Food",
            queries: &[
                "what local food and dishes is {e} best known for",
                "traditional recipes and cuisine of the town of {e}",
                "what should a visitor to {e} try to eat there",
                "typical meals and local specialities served in {e} today",
            ],
            facts: &[
                "The best-known dish of {e} is a stew of {lamb|smoked fish|beans} and {barley|potatoes|leeks}, served on feast days.",
                "Bakers in {e} make a sweet bread flavoured with {honey|cardamom|apples|caraway} that locals have for breakfast.",
                "{e} is famous for a sharp {goat|sheep} cheese that is aged in cellars for {6-18} months.",
                "Fried {herring|trout|eel} with mustard sauce is offered by nearly every tavern in {e}.",
                "A dark {plum|berry|pear} jam made in {e} is sold in jars at the Saturday market.",
                "On winter evenings families in {e} drink hot spiced {cider|wine|milk} with their supper.",
            ],
            decoys: &[
                "The {e} Dish is the nickname of a large radio telescope built on the hill above the town.",
                "Recipes for {e} is a comedy about a mayor who tries to win an election with soup.",
                "Fish and Chips, a racing pigeon from {e}, won a national championship in {1990-2020}.",
            ],
        },
        Aspect {
            label: "Transport",
            queries: &[
                "how do you get to {e} by train, bus or car",
                "public transport and main roads in the town of {e}",
                "what is the best way to travel to and around {e}",
                "does {e} have a railway station or an airport nearby",
            ],
            facts: &[
                "Trains from the capital reach {e} in about {2-5} hours, with {3-8} departures a day.",
                "A ferry links {e} with the islands across the bay, sailing every {30-90} minutes in summer.",
                "Buses leave the main square of {e} every hour for the neighbouring villages and the regional hospital.",
                "The nearest airport is {20-80} kilometres from {e}, and a shuttle bus meets most flights.",
                "A narrow mountain pass with many hairpin bends is the only route into {e} by car.",
                "Cycle lanes now connect every district of {e}, and bikes can be hired next to the harbour.",
            ],
            decoys: &[
                "The Last Train to {e} is a jazz album recorded by a local quartet in {1960-1985}.",
                "The {e} Car Club restores vintage tractors and shows them at the county fair.",
                "{e} Station is a popular radio programme about gardening and home cooking.",
            ],
        },
        Aspect {
            label: "Festivals",
            queries: &[
                "what festivals and celebrations take place in {e} each year",
                "annual events and old traditions held in the town of {e}",
                "when is the big yearly festival in {e} and what happens",
                "cultural celebrations and local customs of the people of {e}",
            ],
            facts: &[
                "Every {June|July|August} {e} holds a lantern night, when hundreds of paper lights float down the river.",
                "The midsummer fair in {e} has dancing around a maypole, wrestling matches and a sheep-shearing contest.",
                "On the first Sunday of {May|October}, the people of {e} parade through the streets in masks and old costumes.",
                "A music weekend in {e} draws around {5-20} thousand visitors each summer to hear folk and brass bands.",
                "At New Year, bonfires are lit on the hills around {e} to drive away bad luck.",
                "The harvest feast in {e} ends with one long shared table laid out along the main street.",
            ],
            decoys: &[
                "Festival is a {red|yellow} apple variety first grown in an orchard near {e}.",
                "The old {e} Customs House once taxed ships and is now a {hotel|library}.",
                "{e} Celebration is a brand of boxed chocolates sold in supermarkets across the country.",
            ],
        },
    ],
};

const SPECIES: Kind = Kind {
    noun: "animal",
    endings: &["ian", "ish", "ine", "ese", "ar", "ic"],
    animals: &[
        "heron", "marmot", "toad", "beetle", "finch", "vole", "lizard", "moth", "otter", "shrew",
        "owl", "newt",
    ],
    aspects: &[
        Aspect {
            label: "Habitat",
            queries: &[
                "where does the {e} live in the wild",
                "natural habitat and geographic range of the {e}",
                "in which regions and environments can the {e} be found",
                "what kind of places does the {e} make its home in",
            ],
            facts: &[
                "The {e} lives in {damp pine forests|high mountain meadows|coastal salt marshes|slow rivers and ponds} across the northern provinces.",
                "Populations of the {e} occur at altitudes between {200-900} and {1200-2500} metres.",
                "The {e} prefers {rocky slopes|reed beds|old hedgerows|sandy riverbanks} where it can hide from predators.",
                "The {e} ranges from the {eastern|western|southern} coast to the foothills of the central mountains.",
                "The {e} has also been recorded on several small islands, where it shelters in {caves|hollow trees|dense shrubs}.",
                "Farmland is avoided by the {e}, which stays close to undisturbed {woodland|wetland|moorland}.",
            ],
            decoys: &[
                "{e} Habitat is a video game from the {1990s|2000s} in which players build a zoo.",
                "Live Like the {e} is a self-help book about slowing down, written by a yoga teacher.",
                "The {e} Home is a small guesthouse with six rooms on the edge of the national park.",
            ],
        },
        Aspect {
            label: "Diet",
            queries: &[
                "what does the {e} usually eat in the wild",
                "diet and feeding habits of the {e} through the year",
                "what food does the {e} hunt or forage for",
                "how does the {e} find enough food to survive",
            ],
            facts: &[
                "The {e} feeds mainly on {beetles|seeds|snails|small fish|berries} and {worms|grasses|insect larvae|fallen fruit}.",
                "In winter, when little else is left, the {e} survives on {bark|buried seeds|fat stored in its tail}.",
                "The {e} catches its prey at {dawn|dusk|night} with a quick lunge from cover.",
                "Both parents of the {e} bring {insects|chewed leaves|small fish} to their young many times a day.",
                "A single {e} can swallow up to {10-40} percent of its body weight in one day.",
                "The {e} digs through leaf litter with its {claws|beak|snout} to uncover hidden morsels.",
            ],
            decoys: &[
                "{e} Diet is a brand of sugar-free lemonade with a picture of the animal on the can.",
                "Eat Like the {e} is a cookbook of vegetarian recipes from the northern provinces.",
                "Hunting the {e} is a comic book about two clumsy poachers who never catch anything.",
            ],
        },
        Aspect {
            label: "Appearance",
            queries: &[
                "what does the {e} look like up close",
                "size, colour and markings of the adult {e}",
                "how can you recognise the {e} by its appearance",
                "physical description of the {e}: body, colours and size",
            ],
            facts: &[
                "An adult {e} is about {10-60} centimetres long and weighs around {50-900} grams.",
                "The {e} has a {brown|grey|olive|rust-red} back and a pale belly with dark {spots|stripes|bars}.",
                "A bright {orange|blue|yellow|red} patch behind each eye makes the {e} easy to tell apart.",
                "Males of the {e} are larger than females and have a longer, darker {tail|crest|mane}.",
                "The {e} has short legs, a rounded body and a tail about half as long as its body.",
                "The young of the {e} are dull grey and gain their full colours in their second year.",
            ],
            decoys: &[
                "The {e} Look was a hairstyle popular among teenagers in the {1960s|1980s}.",
                "Colours of the {e} is an exhibition of abstract paintings at the national gallery.",
                "Recognition for the {e} came when a children's author made it the hero of a bedtime story.",
            ],
        },
        Aspect {
            label: "Behaviour",
            queries: &[
                "how does the {e} behave and does it live in groups",
                "daily behaviour and social life of the {e} in the wild",
                "is the {e} active during the day or at night",
                "behaviour of the {e}: groups, territory and communication",
            ],
            facts: &[
                "The {e} lives in small family groups of {3-12} animals that defend a shared territory.",
                "Most of the day the {e} rests in cover, coming out only after {sunset|dawn}.",
                "The {e} warns others of danger with a sharp {whistle|click|bark} and a flick of its tail.",
                "Outside the breeding season the {e} is solitary and chases rivals away from its patch.",
                "In cold months the {e} gathers in huddles of {50-300} to share warmth.",
                "The {e} is very shy and freezes motionless when a person comes near.",
            ],
            decoys: &[
                "Good Behaviour is a children's song in which a cartoon {e} teaches table manners.",
                "The {e} Night Club is a dance venue on the harbour front of the capital.",
                "Social Life of the {e} is an art-house film about two lonely musicians.",
            ],
        },
        Aspect {
            label: "Breeding",
            queries: &[
                "how and when does the {e} breed and raise its young",
                "reproduction, mating season and nesting of the {e}",
                "how many young does the {e} have each year",
                "mating habits of the {e} and care of its offspring",
            ],
            facts: &[
                "The {e} breeds once a year in {spring|early summer}, and each female has {2-6} young.",
                "The nest of the {e} is a {cup of moss|burrow|mound of reeds} lined with {feathers|dry grass|soft hair}.",
                "The young of the {e} leave the nest after {3-8} weeks but stay near their parents until autumn.",
                "During courtship the male {e} performs a dance and offers food to the female.",
                "Pairs of the {e} often stay together for several seasons and return to the same site.",
                "Eggs of the {e} hatch after about {10-30} days, guarded by the female alone.",
            ],
            decoys: &[
                "The {e} Nest is a café and bookshop opposite the old museum of natural history.",
                "Mating Season is a comedy about two rival zookeepers and an escaped {e}.",
                "Raising the {e} is a board game in which players race to build a wildlife park.",
            ],
        },
        Aspect {
            label: "Conservation",
            queries: &[
                "is the {e} endangered and what threatens it today",
                "conservation status and main threats to the {e}",
                "how many individuals of the {e} are left in the wild",
                "what is being done to protect the {e} from extinction",
            ],
            facts: &[
                "The {e} is listed as {vulnerable|endangered|near threatened}, with fewer than {2-40} thousand adults left.",
                "Draining of wetlands and new roads have destroyed much of the land the {e} depends on.",
                "Since {1990-2015} the {e} has been protected by law, and harming it carries a heavy fine.",
                "Volunteers count the {e} every spring, and numbers have slowly risen in the nature reserves.",
                "Feral cats and pesticides are the main dangers for the {e}, according to wildlife officers.",
                "A breeding programme at the national zoo has brought the {e} back to {3-9} sites where it had died out.",
            ],
            decoys: &[
                "The {e} Protection Agency is a private security firm named after the animal on its logo.",
                "Endangered is a thriller whose detective keeps a stuffed {e} on her desk.",
                "The {e} Trust is a small savings bank with branches in the northern provinces.",
            ],
        },
    ],
};

/// Kinds in the order families take them.
const KINDS: [&Kind; 2] = [&TOWN, &SPECIES];

/// Stems are built as onset + vowel + middle + vowel + coda ("v"+"a"+"r"+"e"+"l").
const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "br", "dr", "gr", "kr", "st",
    "th", "tr",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u"];
const MIDDLES: &[&str] = &["l", "r", "n", "m", "s", "v", "d", "th"];
const CODAS: &[&str] = &["l", "n", "r", "s", "k", "m"];
/// Real words the stem pattern can produce; skipped.
const REAL_WORDS: &[&str] = &[
    "baron", "demon", "felon", "lemon", "melon", "penis", "rumor", "salon", "semen", "sodom",
    "talon", "tumor", "venom",
];

/// A subject: its display name and kind.
struct Entity {
    name: String,
    kind: &'static Kind,
}

/// One document before ids are assigned.
struct Doc {
    title: String,
    text: String,
}

/// The generated collection: documents in corpus order, and each query with its text and
/// relevant documents (indices into `docs`); train queries come first.
struct Collection {
    docs: Vec<Doc>,
    queries: Vec<(String, Vec<usize>)>,
}

/// Picks one of `items`.
fn pick<'a, T: ?Sized>(rng: &mut Rng, items: &[&'a T]) -> &'a T {
    items[rng.below(items.len())]
}

/// True with probability `p`.
fn chance(rng: &mut Rng, p: f64) -> bool {
    rng.next_f64() < p
}

/// Fisher–Yates shuffle.
fn shuffle<T>(rng: &mut Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

/// Expands a template: `{e}` → `name`, `{a|b}` → one alternative, `{lo-hi}` → an integer.
fn expand(template: &str, name: &str, rng: &mut Rng) -> String {
    let mut out = String::with_capacity(template.len() + 24);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}').expect("unclosed `{` in a template");
        let slot = &rest[open + 1..close];
        let range = slot
            .split_once('-')
            .and_then(|(lo, hi)| Some((lo.parse::<usize>().ok()?, hi.parse::<usize>().ok()?)));
        match (slot, range) {
            ("e", _) => out.push_str(name),
            (_, Some((lo, hi))) => out.push_str(&(lo + rng.below(hi - lo + 1)).to_string()),
            _ => {
                let options: Vec<&str> = slot.split('|').collect();
                out.push_str(pick(rng, &options));
            }
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Upper-cases the first letter (species names open sentences as "the Varelian heron").
fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `n` subjects in families of `family_size` look-alike names; families alternate kinds.
fn entities(n: usize, family_size: usize, rng: &mut Rng) -> Vec<Entity> {
    let mut stems = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    let mut family = 0;
    while out.len() < n {
        let kind = KINDS[family % KINDS.len()];
        family += 1;
        let stem = loop {
            let s = [ONSETS, VOWELS, MIDDLES, VOWELS, CODAS]
                .map(|part| pick(rng, part))
                .concat();
            if !REAL_WORDS.contains(&s.as_str()) && stems.insert(s.clone()) {
                break capitalise(&s);
            }
        };
        let animal = (!kind.animals.is_empty()).then(|| pick(rng, kind.animals));
        let mut endings = kind.endings.to_vec();
        shuffle(rng, &mut endings);
        for ending in endings.iter().take(family_size.min(n - out.len())) {
            let name = match animal {
                Some(a) => format!("{stem}{ending} {a}"),
                None => format!("{stem}{ending}"),
            };
            out.push(Entity { name, kind });
        }
    }
    out
}

/// A document title: mostly the subject's name, sometimes with its kind or the aspect.
fn title(entity: &Entity, aspect: &Aspect, rng: &mut Rng) -> String {
    let name = capitalise(&entity.name);
    match rng.below(20) {
        0..=11 => name,
        12..=18 => format!("{name} ({})", entity.kind.noun),
        _ => format!("{name}: {}", aspect.label),
    }
}

/// Checks the spec and builds the collection (deterministic in the spec).
fn generate(spec: &SyntheticSpec) -> Result<Collection> {
    let topics = spec.entities * 6;
    let bad = |msg: String| {
        Err(Error::InvalidArgument(format!(
            "synthetic collection: {msg}"
        )))
    };
    if spec.entities == 0 || spec.train_queries + spec.test_queries > topics {
        return bad(format!(
            "{} train + {} test queries need at least that many topics; {} subjects give {topics}",
            spec.train_queries, spec.test_queries, spec.entities
        ));
    }
    if !(1..=6).contains(&spec.max_relevant) || !(1..=6).contains(&spec.family_size) {
        return bad("max_relevant and family_size must be in 1..=6".into());
    }
    if !(0.0..=1.0).contains(&spec.decoy_rate) {
        return bad(format!("decoy_rate {} is not in [0, 1]", spec.decoy_rate));
    }
    // Separate streams, so the corpus does not depend on the query counts.
    let mut names_rng = Rng::new(spec.seed ^ 0x6E61_6D65);
    let mut docs_rng = Rng::new(spec.seed ^ 0x646F_6373);
    let mut query_rng = Rng::new(spec.seed ^ 0x7175_6572);
    let entities = entities(spec.entities, spec.family_size, &mut names_rng);

    // Documents topic by topic; `relevant[t]` lists topic t's facts.
    let mut docs = Vec::new();
    let mut relevant: Vec<Vec<usize>> = Vec::with_capacity(topics);
    for entity in &entities {
        for aspect in entity.kind.aspects {
            // One fact per document, never repeated within a topic; one fact is rare.
            let count = if spec.max_relevant == 1 || chance(&mut docs_rng, 0.12) {
                1
            } else {
                2 + docs_rng.below(spec.max_relevant - 1)
            };
            let mut facts = aspect.facts.to_vec();
            shuffle(&mut docs_rng, &mut facts);
            let mut ids = Vec::with_capacity(count);
            for fact in &facts[..count] {
                ids.push(docs.len());
                docs.push(Doc {
                    title: title(entity, aspect, &mut docs_rng),
                    text: capitalise(&expand(fact, &entity.name, &mut docs_rng)),
                });
            }
            relevant.push(ids);
            if chance(&mut docs_rng, spec.decoy_rate) {
                let decoy = pick(&mut docs_rng, aspect.decoys);
                docs.push(Doc {
                    title: capitalise(&entity.name),
                    text: capitalise(&expand(decoy, &entity.name, &mut docs_rng)),
                });
            }
        }
    }

    // Shuffle the corpus so ids carry no structure; `position` remaps the relevance lists.
    let mut shuffled: Vec<(usize, Doc)> = docs.into_iter().enumerate().collect();
    shuffle(&mut docs_rng, &mut shuffled);
    let mut position = vec![0; shuffled.len()];
    for (new, (old, _)) in shuffled.iter().enumerate() {
        position[*old] = new;
    }
    let docs = shuffled.into_iter().map(|(_, d)| d).collect();

    // Queries: distinct topics, train first, one phrasing each.
    let mut chosen: Vec<usize> = (0..topics).collect();
    shuffle(&mut query_rng, &mut chosen);
    chosen.truncate(spec.train_queries + spec.test_queries);
    let queries = chosen
        .iter()
        .map(|&t| {
            let (entity, aspect) = (&entities[t / 6], &entities[t / 6].kind.aspects[t % 6]);
            let text = expand(
                pick(&mut query_rng, aspect.queries),
                &entity.name,
                &mut query_rng,
            );
            let mut rel: Vec<usize> = relevant[t].iter().map(|&d| position[d]).collect();
            rel.sort_unstable();
            (capitalise(&text), rel)
        })
        .collect();
    Ok(Collection { docs, queries })
}

#[derive(Serialize)]
struct CorpusLine<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    title: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct QueryLine<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    text: &'a str,
}

/// `prefix` + `i` zero-padded to `width` digits (more if needed).
fn make_id(prefix: char, i: usize, width: usize) -> String {
    format!("{prefix}{i:0width$}")
}

/// Writes corpus.jsonl (`_id`, `title`, `text`), queries.jsonl (`_id`, `text`) and
/// qrels/train.tsv and qrels/test.tsv (header `query-id\tcorpus-id\tscore`, score 1) into `dir`
/// (created if missing; each file written atomically: temp file + rename).
pub fn write_collection(dir: &Path, spec: &SyntheticSpec) -> Result<CollectionSummary> {
    let coll = generate(spec)?;
    let qrels_dir = dir.join("qrels");
    std::fs::create_dir_all(&qrels_dir).map_err(|e| Error::io(&qrels_dir, e))?;
    let doc_id = |i: usize| make_id('d', i, 5);
    let query_id = |i: usize| make_id('q', i, 4);
    let json_err = |p: &Path, e: serde_json::Error| Error::io(p, e.into());

    let path = dir.join("corpus.jsonl");
    atomic_write(&path, |w| {
        for (i, d) in coll.docs.iter().enumerate() {
            let id = doc_id(i);
            let line = CorpusLine {
                id: &id,
                title: &d.title,
                text: &d.text,
            };
            serde_json::to_writer(&mut *w, &line).map_err(|e| json_err(&path, e))?;
            w.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    })?;

    let path = dir.join("queries.jsonl");
    atomic_write(&path, |w| {
        for (i, (text, _)) in coll.queries.iter().enumerate() {
            let id = query_id(i);
            let line = QueryLine { id: &id, text };
            serde_json::to_writer(&mut *w, &line).map_err(|e| json_err(&path, e))?;
            w.write_all(b"\n").map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    })?;

    let (train, test) = coll.queries.split_at(spec.train_queries);
    let mut pairs = [0usize; 2];
    for (split, (queries, first)) in [(train, 0), (test, spec.train_queries)].iter().enumerate() {
        let path = qrels_dir.join(["train.tsv", "test.tsv"][split]);
        atomic_write(&path, |w| {
            writeln!(w, "query-id\tcorpus-id\tscore").map_err(|e| Error::io(&path, e))?;
            for (i, (_, rel)) in queries.iter().enumerate() {
                for &d in rel {
                    writeln!(w, "{}\t{}\t1", query_id(first + i), doc_id(d))
                        .map_err(|e| Error::io(&path, e))?;
                }
            }
            Ok(())
        })?;
        pairs[split] = queries.iter().map(|(_, rel)| rel.len()).sum();
    }
    Ok(CollectionSummary {
        documents: coll.docs.len(),
        train_queries: train.len(),
        test_queries: test.len(),
        train_pairs: pairs[0],
        test_pairs: pairs[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_beir_folder;
    use crate::train::data::read_beir_train;
    use std::collections::HashSet;

    const FILES: [&str; 4] = [
        "corpus.jsonl",
        "queries.jsonl",
        "qrels/train.tsv",
        "qrels/test.tsv",
    ];

    fn bytes(dir: &Path) -> Vec<Vec<u8>> {
        FILES
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    }

    #[test]
    fn default_collection_loads_with_the_crate_readers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new/synth"); // created if missing
        let spec = SyntheticSpec::default();
        let sum = write_collection(&dir, &spec).unwrap();
        assert!((1500..=2500).contains(&sum.documents), "{sum:?}");
        assert_eq!((sum.train_queries, sum.test_queries), (300, 100));

        // The BEIR readers reject duplicate ids and unknown query ids.
        let test = read_beir_folder(&dir, "test").unwrap();
        assert_eq!(test.corpus.len(), sum.documents);
        assert_eq!(test.queries.len(), 400);
        assert_eq!(test.qrels.len(), 100);
        assert_eq!(test.qrels.num_judgements(), sum.test_pairs);
        let doc_ids: HashSet<&str> = test.corpus.iter().map(|d| d.id.as_str()).collect();
        test.qrels
            .check_docs_known(&test.qrels_path, |d| doc_ids.contains(d))
            .unwrap();
        assert!(test
            .qrels
            .iter()
            .all(|(q, _)| test.qrels.num_relevant(q) >= 1));
        assert_eq!(test.corpus[42].id, "d00042");
        assert_eq!(test.queries[7].id, "q0007");

        // The training reader checks that every judged document exists.
        let train = read_beir_train(&dir, "train").unwrap();
        assert_eq!(train.queries.len(), 300);
        assert_eq!(train.num_pairs(), sum.train_pairs);
        assert_eq!(train.stats.queries_without_positive, 0);
        let multi = train
            .queries
            .iter()
            .filter(|q| q.positives.len() >= 2)
            .count();
        assert!(multi * 10 >= train.queries.len() * 8, "{multi} of 300");
        assert!(train.queries.iter().all(|q| q.positives.len() <= 5));
        let train_ids: HashSet<&str> = train.queries.iter().map(|q| q.id.as_str()).collect();
        assert!(test.qrels.queries().all(|q| !train_ids.contains(q)));

        // Short, distinct texts.
        let words = |s: &str| s.split_whitespace().count();
        assert!(test.corpus.iter().all(|d| words(&d.text) <= 28));
        assert!(test
            .queries
            .iter()
            .all(|q| (8..=12).contains(&words(&q.text))));
        let texts: HashSet<&str> = test.corpus.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts.len(), test.corpus.len());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec {
            entities: 30,
            train_queries: 40,
            test_queries: 20,
            ..SyntheticSpec::default()
        };
        let [a, b, c] = ["a", "b", "c"].map(|d| tmp.path().join(d));
        write_collection(&a, &spec).unwrap();
        write_collection(&b, &spec).unwrap();
        let other = SyntheticSpec { seed: 7, ..spec };
        write_collection(&c, &other).unwrap();
        assert_eq!(bytes(&a), bytes(&b));
        let (x, y) = (bytes(&a), bytes(&c));
        assert!(x.iter().zip(&y).all(|(x, y)| x != y));
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&a)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = SyntheticSpec::default();
        for spec in [
            SyntheticSpec {
                entities: 10,
                ..base.clone()
            },
            SyntheticSpec {
                entities: 0,
                train_queries: 0,
                test_queries: 0,
                ..base.clone()
            },
            SyntheticSpec {
                max_relevant: 7,
                ..base.clone()
            },
            SyntheticSpec {
                family_size: 0,
                ..base.clone()
            },
            SyntheticSpec {
                decoy_rate: 1.5,
                ..base.clone()
            },
        ] {
            let err = write_collection(tmp.path(), &spec).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{spec:?}: {err}");
        }
        assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    }

    #[test]
    fn templates_are_well_formed() {
        let mut rng = Rng::new(1);
        assert_eq!(
            expand("{e} has {3-3} {x|x}.", "Varel", &mut rng),
            "Varel has 3 x."
        );
        for kind in KINDS {
            for a in kind.aspects {
                // Every relevant document states a different fact: max_relevant ≤ 6 needs 6.
                assert!(a.facts.len() >= 6 && !a.queries.is_empty() && !a.decoys.is_empty());
                for t in a.queries.iter().chain(a.facts).chain(a.decoys) {
                    assert!(t.contains("{e}"), "{t}");
                    let s = expand(t, "Varel", &mut rng);
                    assert!(!s.contains(['{', '}']), "{t}");
                }
            }
        }
    }
}
