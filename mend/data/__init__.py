"""Edit datasets: loaders for public benchmarks and the built-in offline fact table (``mend.data.builtin``)."""
