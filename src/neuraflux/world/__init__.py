"""The built-in knowledge world: a seeded set of fictional entities, the data every stage trains on, and the
judges that measure each stage against the world's ground truth.

    world = generate_world(WorldConfig(seed=0))
    text = pretrain_text(world)
    reward = helpfulness(prompt, response, world) + harmlessness(prompt, response, world)
"""

from neuraflux.world.generator import (
    SPLITS,
    Document,
    Entity,
    ParsedPrompt,
    World,
    WorldConfig,
    answer_sentence,
    generate_world,
    parse_prompt,
)
from neuraflux.world.judges import JudgeScores, harmlessness, helpfulness, honesty, judge
from neuraflux.world.lexicon import exact_match
from neuraflux.world.tasks import (
    QAItem,
    RLPrompt,
    SFTExample,
    about_response,
    practice_preference_pairs,
    preference_pairs,
    pretrain_text,
    qa_items,
    red_team_prompts,
    rl_prompts,
    sft_examples,
)

__all__ = [
    "SPLITS",
    "Document",
    "Entity",
    "ParsedPrompt",
    "World",
    "WorldConfig",
    "generate_world",
    "parse_prompt",
    "JudgeScores",
    "harmlessness",
    "helpfulness",
    "honesty",
    "judge",
    "exact_match",
    "QAItem",
    "RLPrompt",
    "SFTExample",
    "about_response",
    "answer_sentence",
    "practice_preference_pairs",
    "preference_pairs",
    "pretrain_text",
    "qa_items",
    "red_team_prompts",
    "rl_prompts",
    "sft_examples",
]
