"""Side-by-side benchmarks (installed as ``tinydeeplab.benchmarks``); see RESULTS.md."""
