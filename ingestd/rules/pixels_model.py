"""A profile's `pixels:` section as pydantic models: how burned-in text is handled, and the regions that clean it.

```yaml
pixels:
  burned_in: clean            # hold (default) | trust-header | clean
  max_decoded_mb: 1024        # an instance larger than this decoded is held, not cleaned
  compress: none              # none (default): cleaned frames stored uncompressed | rle: RLE Lossless
  regions:                    # the first whose `when` holds cleans the instance
    - name: acme-sono9
      when: {Manufacturer: Acme Imaging, ManufacturerModelName: {matches: "^Sono"}, Rows: 768, Columns: 1024}
      rectangles:
        - {x: 0, y: 0, width: 1024, height: 60}   # or [0, 0, 1024, 60]
```

Every check has the line of what it is about (`ingestd.rules.load` reports `file:line: key: message`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ingestd.deid.pixels import REGION_KEYWORDS
from ingestd.deid.profile import Rectangle, Region, RegionTest
from ingestd.patterns import compile_regex
from ingestd.rules.condition_model import regex_text, text_value
from ingestd.rules.names import did_you_mean, sop_class_uid

__all__ = ["PixelsModel", "RegionModel"]

_FIELDS = (*(keyword for keyword in REGION_KEYWORDS if keyword != "SOPClassUID"), "sop_class")
_SIZES = ("Rows", "Columns")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RectangleModel(_Model):
    """x, y (the top left corner, from the image's top left), width and height, in pixels."""

    x: Annotated[int, Field(ge=0, le=65535)]
    y: Annotated[int, Field(ge=0, le=65535)]
    width: Annotated[int, Field(ge=1, le=65535)]
    height: Annotated[int, Field(ge=1, le=65535)]

    @model_validator(mode="before")
    @classmethod
    def _listed(cls, data: Any) -> Any:
        if isinstance(data, list):
            if len(data) != 4:
                raise ValueError("a rectangle is [x, y, width, height] or {x: .., y: .., width: .., height: ..}")
            return dict(zip(("x", "y", "width", "height"), data, strict=True))
        return data


class RegionConditionModel(_Model):
    """`Keyword: value` (exact), `Keyword: {in: [...]}` or `Keyword: {matches: RE2 pattern}`."""

    equals: str | None = None
    in_: tuple[str, ...] | None = Field(default=None, alias="in")
    matches: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if not data:
                raise ValueError("no condition given: write a value, {in: [...]} or {matches: ...}")
            return data
        if isinstance(data, list):
            raise ValueError("a list needs an operator: write {in: [...]}")  # noqa: TRY004 - pydantic reports ValueError
        return {"equals": data}

    @field_validator("equals", mode="before")
    @classmethod
    def _equals(cls, value: Any) -> Any:
        return text_value(value)

    @field_validator("in_", mode="before")
    @classmethod
    def _in(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("in: needs a list of values, e.g. in: [US, IVUS]")
        return tuple(text_value(item) for item in value)

    @field_validator("matches")
    @classmethod
    def _matches(cls, value: str | None) -> str | None:
        return regex_text(value)

    def test(self, keyword: str) -> RegionTest:
        values = {value for value in (self.equals, *(self.in_ or ())) if value is not None}
        if keyword == "sop_class":
            keyword, values = "SOPClassUID", {sop_class_uid(value) for value in values}
        pattern = compile_regex(self.matches) if self.matches is not None else None
        return RegionTest(keyword, frozenset(values), pattern)


class RegionModel(_Model):
    """One region: its name (in the method text and in `ingestd explain`), when it applies, what it blacks out."""

    name: Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    when: dict[str, RegionConditionModel]
    rectangles: tuple[RectangleModel, ...]

    @field_validator("when", mode="before")
    @classmethod
    def _when(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError(
                "when is a mapping of conditions on the device and image, e.g. {Manufacturer: Acme, Rows: 768, "
                "Columns: 1024}; a region for every instance would black out the same place in all of them"
            )
        unknown = [str(key) for key in value if key not in _FIELDS]
        if unknown:
            raise ValueError(
                "; ".join(
                    f"a region cannot look at '{key}'{did_you_mean(key, _FIELDS)} (it may look at {', '.join(_FIELDS)})"
                    for key in unknown
                )
            )
        for size in _SIZES:
            if size in value and isinstance(value[size], bool | float):
                raise ValueError(f"{size} is a whole number of pixels, e.g. {size}: 768")
        return value

    @field_validator("rectangles", mode="before")
    @classmethod
    def _some(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("rectangles is a list of at least one [x, y, width, height]")
        return value

    @model_validator(mode="after")
    def _fits(self) -> RegionModel:
        sop_class = self.when.get("sop_class")
        for value in (sop_class.equals, *(sop_class.in_ or ())) if sop_class is not None else ():
            if value is not None:
                sop_class_uid(value)  # a ValueError that names the keyword it did not know
        size = {name: self._size(name) for name in _SIZES}
        for index, box in enumerate(self.rectangles):
            if size["Columns"] is not None and box.x + box.width > size["Columns"]:
                raise ValueError(f"rectangle {index} ends at x = {box.x + box.width}, beyond Columns {size['Columns']}")
            if size["Rows"] is not None and box.y + box.height > size["Rows"]:
                raise ValueError(f"rectangle {index} ends at y = {box.y + box.height}, beyond Rows {size['Rows']}")
        return self

    def _size(self, name: str) -> int | None:
        """The largest size a `when` on Rows or Columns allows, or None when it says no number."""
        condition = self.when.get(name)
        if condition is None or condition.matches is not None:
            return None
        values = [value for value in (condition.equals, *(condition.in_ or ())) if value is not None]
        if not values or not all(value.isdigit() for value in values):
            raise ValueError(f"when.{name} is a whole number of pixels, e.g. {name}: 768")
        return max(int(value) for value in values)

    def compile(self) -> Region:
        return Region(
            name=self.name,
            when=tuple(condition.test(keyword) for keyword, condition in self.when.items()),
            rectangles=tuple(Rectangle(box.x, box.y, box.width, box.height) for box in self.rectangles),
        )


class PixelsModel(_Model):
    """A profile's `pixels:` section."""

    burned_in: Literal["hold", "trust-header", "clean"] = "hold"
    max_decoded_mb: Annotated[int, Field(ge=1, le=65536)] = 1024
    compress: Literal["none", "rle"] = "none"
    regions: tuple[RegionModel, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> PixelsModel:
        if self.burned_in == "clean" and not self.regions:
            raise ValueError("burned_in: clean needs at least one entry under regions (where to black out)")
        if self.compress != "none" and self.burned_in != "clean":
            raise ValueError(f"compress is used only with burned_in: clean (this says {self.burned_in})")
        if self.regions and self.burned_in != "clean":
            raise ValueError(f"regions are used only with burned_in: clean (this says {self.burned_in})")
        names = [region.name for region in self.regions]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"region names must differ: {', '.join(twice)} is used twice")
        return self

    def compile(self) -> tuple[Region, ...]:
        return tuple(region.compile() for region in self.regions)
