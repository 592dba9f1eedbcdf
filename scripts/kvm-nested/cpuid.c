/* Dumps the CPUID leaves that describe the guest CPU, pinned to CPU 0 (the
 * APIC ids in leaves 1 and 0xb are per CPU). Compiled and run inside the
 * builder by scripts/kvm-nested/cpu-dump. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <sched.h>
#include <stdio.h>

static unsigned max, emax;

static void leaf(unsigned l, unsigned s)
{
    /* Above the maximum leaf a CPU answers with another leaf's values. */
    if ((l < 0x40000000 && l > max) || (l >= 0x80000000 && l > emax)) {
        printf("cpuid %08x.%02x: above the maximum leaf\n", l, s);
        return;
    }
    unsigned a, b, c, d;
    __cpuid_count(l, s, a, b, c, d);
    printf("cpuid %08x.%02x: eax=%08x ebx=%08x ecx=%08x edx=%08x\n", l, s, a, b, c, d);
}

int main(void)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        perror("sched_setaffinity");
    unsigned a, b, c, d;
    __cpuid(0, max, b, c, d);
    __cpuid(0x80000000, emax, b, c, d);
    leaf(0, 0);
    leaf(1, 0);
    for (unsigned s = 0; s < 8 && max >= 4; s++) {
        __cpuid_count(4, s, a, b, c, d);
        leaf(4, s);
        if ((a & 0x1f) == 0)
            break;
    }
    __cpuid_count(7, 0, a, b, c, d);
    if (max < 7)
        a = 0;
    for (unsigned s = 0; s <= a && s < 4; s++)
        leaf(7, s);
    for (unsigned s = 0; s < 4 && max >= 0xb; s++) {
        leaf(0xb, s);
        __cpuid_count(0xb, s, a, b, c, d);
        if (((c >> 8) & 0xff) == 0)
            break;
    }
    for (unsigned s = 0; s < 64; s++) {
        __cpuid_count(0xd, s, a, b, c, d);
        if (s < 2 || (max >= 0xd && (a || b || c || d)))
            leaf(0xd, s);
    }
    for (unsigned s = 0; s < 2; s++)
        leaf(0x1f, s);
    for (unsigned l = 0x80000000; l <= 0x80000008; l++)
        leaf(l, 0);
    /* The hypervisor range: answered by the hypervisor whatever the maximum
     * basic leaf (TCG: "TCGTCGTCGTCG" unless tcg-cpuid=off, KVM:
     * "KVMKVMKVM" unless kvm=off, else the highest basic leaf's values). */
    leaf(0x40000000, 0);
    leaf(0x40000001, 0);
    printf("cpuid max basic leaf %08x, max extended leaf %08x\n", max, emax);
    return 0;
}
