"""A generated game-play log, for running the pipeline on a second domain offline.

No real games dataset is reachable from the project's machines, so this writes one: a catalogue of
games (title, list of genres, one-line description) and a log of (player, game, time, liked). It is
*generated*, not collected: players have tastes over genres, pick games by popularity and taste, and
like a game with a probability that grows with how well its genres match their taste and with the
game's own quality. Title words are drawn per genre ("Dragon", "Quest" for role-playing games; "Drift",
"Turbo" for racing), as real titles often hint at their genre, so a text-only model has something to
read. Replace these two files with a real log (Steam, Amazon Video Games) and nothing else changes.

    python examples/games/generate_log.py --output_dir outputs/games/raw
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from thinkrec.utils.files import atomic_write


GENRES = {
    "Role-Playing": (["Dragon", "Quest", "Legend", "Realm", "Saga", "Rune"], "a story-driven adventure with character progression"),
    "Strategy": (["Empire", "Conquest", "Dominion", "Tactics", "Siege", "Throne"], "a game of planning, economy and armies"),
    "Racing": (["Drift", "Turbo", "Speed", "Rally", "Nitro", "Circuit"], "fast cars on demanding tracks"),
    "Puzzle": (["Block", "Logic", "Tile", "Riddle", "Cube", "Maze"], "calm brain-teasers of growing difficulty"),
    "Shooter": (["Strike", "Squad", "Warfare", "Sniper", "Assault", "Recon"], "tight gunplay and team battles"),
    "Sports": (["League", "Goal", "Court", "Champion", "Season", "Derby"], "a season of matches and tournaments"),
    "Horror": (["Shadow", "Dread", "Haunt", "Asylum", "Whisper", "Crypt"], "survival in the dark with scarce supplies"),
    "Platformer": (["Jump", "Pixel", "Hop", "Bounce", "Sky", "Dash"], "precise jumps through colourful worlds"),
    "Simulation": (["Farm", "City", "Tycoon", "Harbor", "Station", "Colony"], "building and managing a place of your own"),
    "Fighting": (["Fist", "Combo", "Brawl", "Arena", "Kombat", "Rival"], "one-on-one duels and combo mastery"),
}
SUFFIXES = ["", "", "", " II", " III", ": Origins", ": Remastered", " Deluxe", " Online", ": Reborn"]
CONNECTORS = ["of", "&", "and the"]


def make_games(num_games: int, rng: np.random.Generator) -> list[dict]:
    names = list(GENRES)
    games, seen = [], set()
    while len(games) < num_games:
        count = rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])
        genres = [names[i] for i in rng.choice(len(names), count, replace=False)]
        words = GENRES[genres[0]][0] + (GENRES[genres[-1]][0] if len(genres) > 1 else [])
        first, second = rng.choice(words, 2, replace=False)
        title = f"{first} {rng.choice(CONNECTORS)} {second}{rng.choice(SUFFIXES)}" if rng.random() < 0.4 else f"{first} {second}{rng.choice(SUFFIXES)}"
        if title in seen:
            continue
        seen.add(title)
        description = f"{title} is {GENRES[genres[0]][1]}" + (f", with elements of {', '.join(g.lower() for g in genres[1:])}." if len(genres) > 1 else ".")
        games.append({"game": f"g{len(games):04d}", "name": title, "categories": genres, "description": description})
    return games


def make_plays(games: list[dict], num_players: int, plays_per_player: float, rng: np.random.Generator) -> list[dict]:
    names = list(GENRES)
    genre_matrix = np.array([[float(name in game["categories"]) for name in names] for game in games])
    genre_matrix /= genre_matrix.sum(1, keepdims=True)
    popularity = rng.zipf(1.6, len(games)).clip(max=200).astype(float)
    quality = rng.normal(0, 0.7, len(games))
    plays = []
    for player in range(num_players):
        taste = rng.dirichlet(np.full(len(names), 0.3))
        dislike = rng.dirichlet(np.full(len(names), 0.3))
        match = genre_matrix @ taste - 0.5 * (genre_matrix @ dislike)
        weights = popularity * (0.2 + genre_matrix @ taste)
        count = max(5, int(rng.poisson(plays_per_player)))
        chosen = rng.choice(len(games), min(count, len(games)), replace=False, p=weights / weights.sum())
        # Players join over three months and play over a year, so a split by time finds most of them in train.
        start = int(rng.integers(1_600_000_000, 1_600_000_000 + 90 * 86_400))
        times = start + np.sort(rng.integers(0, 365 * 86_400, len(chosen)))
        # Liked with a probability that follows how well the genres fit (in standard deviations) and quality.
        fit = (match[chosen] - match.mean()) / match.std()
        liked_probability = 1 / (1 + np.exp(-(2.0 * fit + quality[chosen])))
        for game, time, p in zip(chosen, times, liked_probability):
            plays.append({"player": f"p{player:05d}", "game": games[game]["game"], "time": int(time),
                          "liked": int(rng.random() < p)})
    return plays


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Never half-written: the project's atomic write (a temporary file renamed into place)."""
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    atomic_write(path, write)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/games/raw")
    parser.add_argument("--num_players", type=int, default=3000)
    parser.add_argument("--num_games", type=int, default=600)
    parser.add_argument("--plays_per_player", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    games = make_games(args.num_games, rng)
    plays = make_plays(games, args.num_players, args.plays_per_player, rng)
    output = Path(args.output_dir)
    write_jsonl(games, output / "games.jsonl")
    write_jsonl(plays, output / "plays.jsonl")
    summary = {"players": args.num_players, "games": len(games), "plays": len(plays),
               "liked_share": round(float(np.mean([row["liked"] for row in plays])), 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
