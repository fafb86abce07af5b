/* Drives the vfio-pause C ABI through open / pause / unpause / close.
 *
 *   cycle sim
 *       simulated backend: no VFIO needed (host unit test).
 *   cycle real <pf-bdf> <vf-bdf> <numvfs> <cycles>
 *       real VFIO (lab): the VF must be bound to vfio-pci. Each cycle pauses,
 *       writes sriov_numvfs=0 and =numvfs on the PF, binds the VF to
 *       vfio-pci again and unpauses onto it.
 *
 * Prints "cycle: ok" and exits 0 on success.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vfio_pause.h"

#define CHECK(call)                                                            \
    do {                                                                       \
        enum VpStatus st_ = (call);                                            \
        if (st_ != VP_OK) {                                                    \
            fprintf(stderr, "cycle: %s failed: status %d: %s\n", #call,        \
                    (int)st_, vp_last_error());                                \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

static int sysfs_write(const char *path, const char *value)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cycle: open %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (fputs(value, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "cycle: write %s to %s: %s\n", value, path, strerror(errno));
        return -1;
    }
    return 0;
}

static void print_timings(const char *what, const VpTimings *t)
{
    printf("%s: total %.3f ms", what, t->total_ns / 1e6);
    for (uint32_t i = 0; i < VP_PHASE_COUNT; i++) {
        if (t->phase_ns[i])
            printf(", %s %.3f ms", vp_phase_name(i), t->phase_ns[i] / 1e6);
    }
    printf("\n");
}

static uint32_t read32(VpDevice *d, uint64_t off)
{
    uint32_t v = 0;
    CHECK(vp_device_config_read(d, off, (uint8_t *)&v, sizeof v));
    return v;
}

#ifdef VP_SIM
/* The simulated backend exists only in a library built with the `sim`
 * feature (vfio-pause's own tests); the production library has none. */
static int run_sim(void)
{
    VpContainer *c = NULL;
    VpDevice *d = NULL;
    VpIdentity nvme = {0x1b36, 0x0010, 0x1af4, 0x1100, 0x010802};
    VpIdentity igb = {0x8086, 0x10ca, 0x8086, 0x0000, 0x020000};
    VpTimings t;
    uint32_t state;

    CHECK(vp_container_new_simulated(&c));
    CHECK(vp_sim_add_vf(c, "0000:02:00.1", &nvme));
    CHECK(vp_sim_add_vf(c, "0000:01:10.0", &igb));
    CHECK(vp_device_open(c, "nvme0", "0000:02:00.1", -1, 0, NULL, &d));
    if (read32(d, 0) != 0x00101b36) {
        fprintf(stderr, "cycle: wrong ids %08x\n", read32(d, 0));
        return 1;
    }
    CHECK(vp_device_pause(d, &t));
    print_timings("pause", &t);
    CHECK(vp_sim_remove_vf(c, "0000:02:00.1"));
    if (vp_device_unpause(d, "0000:01:10.0", -1, &t) != VP_ERR_IDENTITY_MISMATCH) {
        fprintf(stderr, "cycle: unpause onto igb did not fail with identity mismatch\n");
        return 1;
    }
    printf("wrong identity: %s\n", vp_last_error());
    if (vp_device_unpause(d, "0000:02:00.1", -1, &t) != VP_ERR_VF_GONE) {
        fprintf(stderr, "cycle: unpause onto a gone VF did not fail with VP_ERR_VF_GONE\n");
        return 1;
    }
    CHECK(vp_sim_add_vf(c, "0000:02:00.1", &nvme));
    CHECK(vp_device_unpause(d, "0000:02:00.1", -1, &t));
    print_timings("unpause", &t);
    CHECK(vp_device_state(d, &state));
    if (state != 0 || read32(d, 0) != 0x00101b36) {
        fprintf(stderr, "cycle: not attached after unpause\n");
        return 1;
    }
    CHECK(vp_device_close(d));
    vp_container_free(c);
    printf("cycle: ok\n");
    return 0;
}
#endif

static int run_real(const char *pf, const char *vf, const char *numvfs, int cycles)
{
    char path[256];
    VpContainer *c = NULL;
    VpDevice *d = NULL;
    VpIdentity id;
    VpTimings t;
    size_t ram_size = 16u << 20;
    void *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED) {
        perror("cycle: mmap guest ram");
        return 1;
    }
    CHECK(vp_container_new(&c));
    CHECK(vp_container_map_dma(c, 0, ram_size, ram));
    CHECK(vp_device_open(c, "vf0", vf, -1, 0, NULL, &d));
    CHECK(vp_device_identity(d, &id));
    printf("opened %s: %04x:%04x class %06x\n", vf, id.vendor, id.device, id.class_code);
    /* Wire MSI-X vector 0 and the request IRQ; both are re-wired at unpause. */
    int msix_fd = eventfd(0, EFD_CLOEXEC), req_fd = eventfd(0, EFD_CLOEXEC);
    if (msix_fd < 0 || req_fd < 0) {
        perror("cycle: eventfd");
        return 1;
    }
    CHECK(vp_device_set_irqs(d, 2, &msix_fd, 1));
    CHECK(vp_device_set_request_irq(d, req_fd));
    uint32_t ids = read32(d, 0);
    for (int i = 0; i < cycles; i++) {
        uint32_t bar0 = 0;
        CHECK(vp_device_bar_read(d, 0, 0, (uint8_t *)&bar0, sizeof bar0));
        CHECK(vp_device_pause(d, &t));
        print_timings("pause", &t);
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/sriov_numvfs", pf);
        if (sysfs_write(path, "0") || sysfs_write(path, numvfs))
            return 1;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/driver_override", vf);
        if (sysfs_write(path, "vfio-pci") || sysfs_write("/sys/bus/pci/drivers_probe", vf))
            return 1;
        CHECK(vp_device_unpause(d, vf, -1, &t));
        print_timings("unpause", &t);
        uint32_t bar0_after = 0;
        CHECK(vp_device_bar_read(d, 0, 0, (uint8_t *)&bar0_after, sizeof bar0_after));
        if (read32(d, 0) != ids || bar0_after != bar0) {
            fprintf(stderr, "cycle %d: registers differ after unpause (%08x/%08x vs %08x/%08x)\n",
                    i, read32(d, 0), bar0_after, ids, bar0);
            return 1;
        }
    }
    uint8_t unplug = 9;
    CHECK(vp_device_request_is_unplug(d, &unplug));
    if (unplug != 1) {
        fprintf(stderr, "cycle: request IRQ not wired after the cycles\n");
        return 1;
    }
    CHECK(vp_device_close(d));
    vp_container_free(c);
    close(msix_fd);
    close(req_fd);
    munmap(ram, ram_size);
    printf("cycle: ok\n");
    return 0;
}

int main(int argc, char **argv)
{
#ifdef VP_SIM
    if (argc == 2 && strcmp(argv[1], "sim") == 0)
        return run_sim();
#endif
    if (argc == 6 && strcmp(argv[1], "real") == 0)
        return run_real(argv[2], argv[3], argv[4], atoi(argv[5]));
    fprintf(stderr, "usage: cycle sim | cycle real <pf> <vf> <numvfs> <cycles>\n");
    return 2;
}
