"""simkit: discrete-event simulation of split and federated learning on fleets of real devices.

The public API is small on purpose:

- :func:`run` -- simulate one scenario, get a :class:`RunResult`;
- :func:`load_scenario`, :func:`scenario_from_dict`, :func:`with_changes`, :class:`Scenario`;
- :func:`load_profiles`, :class:`DeviceProfile`;
- :func:`c3_score` -- simkit's C3-Score (pluggable);
- :class:`SimkitError` -- base of every error simkit raises on bad input.
"""

from simkit.config import DeviceProfile, Scenario, load_profiles, load_scenario, scenario_from_dict, with_changes
from simkit.errors import SimkitError
from simkit.metrics import c3_score

# Bound after the submodule import on purpose: ``simkit.run`` is the function (importing the
# submodule ``simkit.run`` later does not rebind the package attribute).
from simkit.run import RunResult, run  # noqa: E402

__version__ = "0.1.0"


__all__ = ["run", "RunResult", "Scenario", "load_scenario", "scenario_from_dict", "with_changes", "load_profiles",
           "DeviceProfile", "c3_score", "SimkitError", "__version__"]
