"""bench/kernel_sass.py: its SASS parsing on a hand-written listing, and its rows on a real CUBIN."""

from __future__ import annotations

import pytest

from bench import kernel_sass

LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_2:
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0040*/              @!P0 BRA `(.L_x_2) ;
        /*0050*/                   HFMA2 R6, R3, R3, R6 ;
        /*0060*/                   FFMA R7, R6, R6, R7 ;
        /*0070*/               @P1 BRA `(.L_x_1) ;
        /*0080*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*0090*/                   EXIT ;
        /*00a0*/                   NOP ;
""".splitlines()


def test_loops_are_backward_branches_and_the_busiest_is_the_steady_state() -> None:
    found = kernel_sass.loops(LISTING)
    assert [(loop.start, loop.end) for loop in found] == [(2, 4), (1, 7)]  # the forward BRA is no loop
    loop = kernel_sass.steady_state_loop(LISTING)
    assert (loop.start, loop.end) == (1, 7)  # 3 multiply-adds, against the inner loop's 1
    assert loop.opcodes == ("LDG.E", "FFMA", "IADD3", "BRA", "HFMA2", "FFMA", "BRA")


def test_ptxas_log_gives_registers_and_spills_per_function_and_arch() -> None:
    log = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers"""
    assert kernel_sass.ptxas_resources(log, "sm_90") == {"k1": (96, 32), "k2": (40, 0)}
    assert kernel_sass.ptxas_resources(log, "sm_80") == {}


def test_rows_of_a_compiled_kernel_have_the_documented_keys() -> None:
    try:
        kernel_sass.tool_path("nvdisasm")
    except FileNotFoundError as exc:
        pytest.skip(f"nvdisasm is not installed ({exc})")
    instance = kernel_sass.instances()[0]
    row = kernel_sass.measure(instance, "sm_90")
    assert tuple(row) == kernel_sass.ROW_KEYS
    assert row["loop_instructions"] > 0 and row["registers"] > 0
    assert row["instructions_per_weight"] == pytest.approx(
        row["loop_instructions"] / row["weights_per_iteration"], 1e-3
    )
