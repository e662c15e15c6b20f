"""Test support shared by the suites: infrastructure selection, recording fakes, builders."""
