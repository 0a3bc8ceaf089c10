// SPDX-License-Identifier: GPL-2.0
/*
 * seedsim: a SIMULATION, used only by kvmtrace's VM tests (tests/vm/), of the VM-type
 * dispatch that the 2023 TDX v12 patch series ("KVM: x86: Add is_vm_type_supported
 * callback") proposed for KVM. That series was never merged in this form: no stock
 * kernel has these functions. This module is NOT that patch and NOT KVM; it only
 * reproduces the call chain under the patch's function names, so that kvmtrace's
 * probe planner (which picks up any *_is_vm_type_supported in kallsyms) can attach
 * kprobes to real module functions by name and count their verdicts:
 *
 *   kvm_arch_init_vm(kvm, type)                     (real KVM, not simulated)
 *     if (!kvm_is_vm_type_supported(type)) return -EINVAL;
 *
 *   kvm_is_vm_type_supported(type)                  simulated here
 *     -> kvm_x86_ops.is_vm_type_supported(type)      (static_call in the patch)
 *          VMX: vmx_is_vm_type_supported(type)       accepts KVM_X86_DEFAULT_VM (0) only
 *          SVM: svm_is_vm_type_supported(type)
 *                 -> __kvm_is_vm_type_supported(type) accepts DEFAULT (0) and
 *                                                     PROTECTED_VM (1)
 *
 * Trigger: echo TYPE > /sys/kernel/debug/kvmtrace_seedsim/vm_type runs
 * kvm_is_vm_type_supported(TYPE) with the vendor chosen by
 * echo vmx|svm > /sys/kernel/debug/kvmtrace_seedsim/vendor. Like KVM_CREATE_VM, the
 * write fails with EINVAL when the type is not supported (and succeeds otherwise);
 * reading vm_type gives "TYPE VERDICT" of the last call.
 *
 * Every function of the chain is noinline and noipa (no clones such as .isra.0, whose
 * names the planner would not trace), and the module is built with
 * -fno-optimize-sibling-calls so each call stays a call and the kretprobes nest.
 */
#include <linux/debugfs.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_PROTECTED_VM 1 /* the v12 series' number for a protected VM */

#define SIM_FN noinline __attribute__((__noipa__))

/* Simulated x86.c: the generic check the SVM callback defers to. */
SIM_FN bool __kvm_is_vm_type_supported(unsigned long type)
{
	return type == KVM_X86_DEFAULT_VM || type == KVM_X86_PROTECTED_VM;
}

/* Simulated vmx.c: only the default VM type. */
SIM_FN bool vmx_is_vm_type_supported(unsigned long type)
{
	return type == KVM_X86_DEFAULT_VM;
}

/* Simulated svm.c: defers to the generic check. */
SIM_FN bool svm_is_vm_type_supported(unsigned long type)
{
	return __kvm_is_vm_type_supported(type);
}

/* The vendor callback: static_call(kvm_x86_is_vm_type_supported) in the patch. */
struct seedsim_x86_ops {
	const char *name;
	bool (*is_vm_type_supported)(unsigned long type);
};

static const struct seedsim_x86_ops vmx_x86_ops = { "vmx", vmx_is_vm_type_supported };
static const struct seedsim_x86_ops svm_x86_ops = { "svm", svm_is_vm_type_supported };
static const struct seedsim_x86_ops *kvm_x86_ops = &vmx_x86_ops;
static DEFINE_MUTEX(seedsim_lock);

/* Simulated x86.c: what kvm_arch_init_vm() would call. */
SIM_FN bool kvm_is_vm_type_supported(unsigned long type)
{
	return READ_ONCE(kvm_x86_ops)->is_vm_type_supported(type);
}

static unsigned long last_type;
static bool last_verdict;
static struct dentry *dir;

static ssize_t vm_type_write(struct file *f, const char __user *buf, size_t len, loff_t *pos)
{
	unsigned long type;
	bool ok;
	int err = kstrtoul_from_user(buf, len, 0, &type);

	if (err)
		return err;
	mutex_lock(&seedsim_lock);
	ok = kvm_is_vm_type_supported(type);
	last_type = type;
	last_verdict = ok;
	mutex_unlock(&seedsim_lock);
	return ok ? len : -EINVAL;
}

static ssize_t vm_type_read(struct file *f, char __user *buf, size_t len, loff_t *pos)
{
	char out[48];
	int n;

	mutex_lock(&seedsim_lock);
	n = scnprintf(out, sizeof(out), "%lu %d\n", last_type, last_verdict);
	mutex_unlock(&seedsim_lock);
	return simple_read_from_buffer(buf, len, pos, out, n);
}

static ssize_t vendor_write(struct file *f, const char __user *buf, size_t len, loff_t *pos)
{
	char name[8] = {};

	if (len == 0 || len >= sizeof(name))
		return -EINVAL;
	if (copy_from_user(name, buf, len))
		return -EFAULT;
	strim(name);
	mutex_lock(&seedsim_lock);
	if (!strcmp(name, "vmx"))
		WRITE_ONCE(kvm_x86_ops, &vmx_x86_ops);
	else if (!strcmp(name, "svm"))
		WRITE_ONCE(kvm_x86_ops, &svm_x86_ops);
	else
		len = -EINVAL;
	mutex_unlock(&seedsim_lock);
	return len;
}

static ssize_t vendor_read(struct file *f, char __user *buf, size_t len, loff_t *pos)
{
	char out[8];
	int n = scnprintf(out, sizeof(out), "%s\n", READ_ONCE(kvm_x86_ops)->name);

	return simple_read_from_buffer(buf, len, pos, out, n);
}

static const struct file_operations vm_type_fops = {
	.owner = THIS_MODULE,
	.write = vm_type_write,
	.read = vm_type_read,
	.llseek = default_llseek,
};

static const struct file_operations vendor_fops = {
	.owner = THIS_MODULE,
	.write = vendor_write,
	.read = vendor_read,
	.llseek = default_llseek,
};

static int __init seedsim_init(void)
{
	dir = debugfs_create_dir("kvmtrace_seedsim", NULL);
	if (IS_ERR(dir))
		return PTR_ERR(dir);
	debugfs_create_file("vm_type", 0600, dir, NULL, &vm_type_fops);
	debugfs_create_file("vendor", 0600, dir, NULL, &vendor_fops);
	pr_info("kvmtrace seedsim: SIMULATION of the 2023 TDX v12 vm_type dispatch, for tests only\n");
	return 0;
}

static void __exit seedsim_exit(void)
{
	debugfs_remove_recursive(dir);
}

module_init(seedsim_init);
module_exit(seedsim_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kvmtrace test-only SIMULATION of the 2023 TDX v12 vm_type dispatch");
