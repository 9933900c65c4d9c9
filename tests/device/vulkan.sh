# Sourced by the device scripts: the Vulkan loader from .gl/*.deb (the lent machine has the
# NVIDIA driver but no loader), and on a headless machine the driver's EGL library as the ICD
# (its GLX library finds no display and gives the loader no vkCreateInstance).
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
ldconfig -p | grep -q libvulkan || echo "no libvulkan"
if ldconfig -p | grep -q libEGL_nvidia.so.0; then
    echo '{"file_format_version":"1.0.1","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.3.0"}}' > /tmp/nvidia_egl_icd.json
    export VK_ICD_FILENAMES=/tmp/nvidia_egl_icd.json
fi
