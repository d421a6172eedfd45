"""Kernel constructs in plain C, for unit tests that compile small files with gcc (``gcc.py``).

``STATIC_CPU_HAS`` is 6.1's ``static_cpu_has()`` (arch/x86/include/asm/cpufeature.h) without the
kernel's headers: a ``jmp`` to a run-time test of the feature bit in ``.altinstr_aux`` that jumps
back into the function, and two alternatives on that ``jmp`` (ALTERNATIVE_TERNARY): one always
applied, replacing it with a jump to the "no" label, and one applied when the CPU has the feature,
replacing it with nothing (NOPs), so that the code falls through to "yes".
"""

STATIC_CPU_HAS = r"""
struct cpuinfo { unsigned char caps[32]; };
extern struct cpuinfo boot_cpu_data;
#define X86_FEATURE_ALWAYS (3 * 32 + 21)

static inline __attribute__((always_inline)) int static_cpu_has(unsigned short bit)
{
    asm goto("661:\n\tjmp 6f\n662:\n"
        ".pushsection .altinstructions,\"a\"\n"
        " .long 661b - .\n .long 663f - .\n .word %c[always]\n .byte 662b - 661b\n .byte 664f - 663f\n"
        " .long 661b - .\n .long 664f - .\n .word %c[feature]\n .byte 662b - 661b\n .byte 665f - 664f\n"
        ".popsection\n"
        ".pushsection .altinstr_replacement,\"ax\"\n"
        "663:\n\tjmp %l[t_no]\n664:\n665:\n"
        ".popsection\n"
        ".pushsection .altinstr_aux,\"ax\"\n"
        "6:\n\ttestb %[bitnum], %P[cap_byte](%%rip)\n\tjnz %l[t_yes]\n\tjmp %l[t_no]\n"
        ".popsection\n"
        : : [always] "i"(X86_FEATURE_ALWAYS), [feature] "i"(bit), [bitnum] "i"(1 << (bit & 7)),
            [cap_byte] "i"(&boot_cpu_data.caps[bit >> 3]) : : t_yes, t_no);
    return 1;
t_no:
    return 0;
t_yes:
    return 1;
}
"""
