/* Wine 8 (Debian 12) lacks bcryptprimitives.dll, whose ProcessPrng Rust's std (1.78+) imports on
 * Windows, so every test binary fails to start. This stand-in serves it from advapi32's RtlGenRandom.
 * Built with mingw by .ci/run and placed in the Wine prefix's system32; never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
