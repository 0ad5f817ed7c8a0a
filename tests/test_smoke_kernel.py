from kernel import Kernel


def test_lambda_runs_in_kernel(kernel: Kernel) -> None:
    cell = kernel.ok("print(ranks.run(lambda x: x + 1, args=(1,), n=2))")
    assert "[2, 2]" in cell.stdout
