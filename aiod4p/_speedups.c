/* aiod4p._speedups: the per-item loops of keyed routing, in C.
 *
 * aiod4p/_groupings.py holds the same contract in Python and uses it when this
 * module was not built (no C compiler at install time); tests run both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(deal_by_key_doc,
"deal_by_key(items, key, destinations, count, /)\n"
"--\n"
"\n"
"Deal ``items`` (a list) into ``count`` lists by ``destinations[key(item)]``.\n"
"\n"
"Returns the lists, each keeping the items' order, or None when some item's\n"
"key is not in ``destinations`` (a dict of ints in ``range(count)``), or when\n"
"``key(item)`` or hashing the key raised an Exception: the caller then sorts\n"
"the batch out itself. Other BaseExceptions (KeyboardInterrupt, SystemExit)\n"
"propagate.");

/* On a pending error: an Exception is swallowed (the caller redoes the batch), anything else propagates. */
static PyObject *
give_up(PyObject *parts)
{
    Py_DECREF(parts);
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

static PyObject *
deal_by_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "deal_by_key() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *items = args[0], *key = args[1], *destinations = args[2];
    if (!PyList_Check(items) || !PyCallable_Check(key) || !PyDict_Check(destinations)) {
        PyErr_SetString(PyExc_TypeError, "deal_by_key() takes a list, a callable, a dict and an int");
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count < 1) {
        PyErr_SetString(PyExc_ValueError, "deal_by_key() needs a count of at least 1");
        return NULL;
    }
    PyObject *parts = PyList_New(count);
    if (parts == NULL) {
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *part = PyList_New(0);
        if (part == NULL) {
            Py_DECREF(parts);
            return NULL;
        }
        PyList_SET_ITEM(parts, index, part);
    }
    /* key() may run any Python code, even code that changes the list: re-read its size each turn. */
    for (Py_ssize_t index = 0; index < PyList_GET_SIZE(items); index++) {
        PyObject *item = PyList_GET_ITEM(items, index);
        Py_INCREF(item);
        PyObject *found = PyObject_CallOneArg(key, item);
        if (found == NULL) {
            Py_DECREF(item);
            return give_up(parts);
        }
        PyObject *destination = PyDict_GetItemWithError(destinations, found); /* borrowed */
        Py_DECREF(found);
        if (destination == NULL) {
            Py_DECREF(item);
            if (PyErr_Occurred()) {
                return give_up(parts);
            }
            Py_DECREF(parts);
            Py_RETURN_NONE;
        }
        Py_ssize_t chosen = PyLong_AsSsize_t(destination);
        if (chosen < 0 || chosen >= count) {
            Py_DECREF(item);
            if (PyErr_Occurred()) {
                return give_up(parts);
            }
            Py_DECREF(parts);
            Py_RETURN_NONE;
        }
        int appended = PyList_Append(PyList_GET_ITEM(parts, chosen), item);
        Py_DECREF(item);
        if (appended < 0) {
            Py_DECREF(parts);
            return NULL;
        }
    }
    return parts;
}

static PyMethodDef speedups_methods[] = {
    {"deal_by_key", (PyCFunction)(void (*)(void))deal_by_key, METH_FASTCALL, deal_by_key_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot speedups_slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiod4p._speedups",
    .m_doc = "The per-item loops of keyed routing, in C (aiod4p/_groupings.py has them in Python too).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
